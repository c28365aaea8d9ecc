"""``jaxrank export``: a fine-tuned run merged into its base model, as HF checkpoint or GGUF.

:func:`export_run` reads the ``adapter/`` folder that ``jaxrank finetune`` wrote
(:func:`jaxrank._adapter_export.load_adapter`: the compacted LoRA factors and the trained
head), loads the same base model again (``minilm``, ``smollm2`` or a local Hugging Face
folder), folds the adapter in (:func:`jaxrank.merge`) and writes

* ``hf/``: the Hugging Face PyTorch-format checkpoint (:func:`jaxrank.save_hf_checkpoint`)
  with the tokenizer files;
* ``model.gguf``: for LLaMA models loaded from a GGUF (``smollm2``), the merged model in that
  GGUF's layout (:func:`jaxrank.save_gguf`).

Example (needs the MiniLM package and a finished run):
  >>> from jaxrank import _export_command
  >>> _export_command.export_run("runs/finetune", model="minilm", formats=("hf",),
  ...                            output_dir="runs/export")  # doctest: +SKIP
  {'hf': PosixPath('runs/export/hf')}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from flax import traverse_util

from jaxrank import _adapter_export
from jaxrank import _gguf_export
from jaxrank import _hf_checkpoint
from jaxrank import _tree
from jaxrank import export

FORMATS = ("hf", "gguf")


class BaseModel(NamedTuple):
  """A base model as ``jaxrank export`` needs it: the Flax module, its params, where its
  tokenizer comes from (a folder or a ``tokenizers.Tokenizer``) and its GGUF (or None)."""

  module: Any
  params: Any
  tokenizer: Any
  gguf_source: Optional[Path]


def load_base_model(model: str, num_labels: Optional[int]) -> BaseModel:
  """The base of ``jaxrank finetune --model MODEL``: ``minilm``, ``smollm2`` or a local
  Hugging Face folder (``num_labels``: the classifier's size, for BERT models)."""
  from jaxrank import _local_models
  if model == "minilm":
    from jaxrank.models import bert
    hf, _ = bert.load_minilm(num_labels=num_labels or 2)
    return BaseModel(hf.module, hf.params, bert.minilm_path(), None)
  if model == "smollm2":
    from jaxrank.models import llama
    hf, tokenizer = llama.load_smollm2()
    return BaseModel(hf.module, hf.params, tokenizer, llama.smollm2_path())
  if _local_models.is_model_directory(model):
    local = _local_models.load_local_model(model, num_labels=num_labels)
    return BaseModel(local.module, local.params, Path(model).expanduser(), None)
  raise ValueError(f"--model {model!r}: jaxrank export rebuilds minilm, smollm2 or a local "
                   "Hugging Face model folder (the --model the run was fine-tuned with).")


def merged_variables(saved: _adapter_export.SavedAdapter, params) -> dict:
  """``{'params': ...}`` of the base ``params`` with the saved head overlaid and the saved
  adapter folded in."""
  flat = traverse_util.flatten_dict(_tree.plain(params))
  for key, value in traverse_util.flatten_dict(saved.head).items():
    if key not in flat:
      raise ValueError(f"the saved head has params/{'/'.join(key)}, which the base model lacks: "
                       "pass the --model the run was fine-tuned with.")
    if tuple(flat[key].shape) != tuple(value.shape):
      raise ValueError(f"the saved head's params/{'/'.join(key)} is {value.shape} but the base "
                       f"model's is {flat[key].shape}: pass the --model the run was fine-tuned "
                       "with.")
    flat[key] = value
  full = traverse_util.unflatten_dict(flat)
  if saved.adapter is None:
    return {"params": full}
  return {"params": export.merge(saved.adapter, {"params": full, "lora": saved.lora})}


def _num_labels(head) -> Optional[int]:
  kernel = head.get("classifier", {}).get("kernel")
  return None if kernel is None else int(kernel.shape[-1])


def export_run(run_dir, *, model: str, formats: Sequence[str] = ("hf",), output_dir,
               tensor_type: Optional[str] = None) -> dict:
  """Merges the run's adapter into ``model`` and writes ``formats``; returns
  ``{format: path}``.

  Raises:
    ValueError: for an unknown format, a folder without an adapter, a head that does not fit
      ``model``, or ``gguf`` for a model that was not loaded from a GGUF.
  """
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ValueError(f"--format must be one or more of {', '.join(FORMATS)} (comma-separated); "
                     f"got {','.join(formats)!r}.")
  run_dir = Path(run_dir)
  adapter_dir = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
  saved = _adapter_export.load_adapter(adapter_dir)
  base = load_base_model(model, _num_labels(saved.head))
  if "gguf" in formats and base.gguf_source is None:
    raise ValueError(f"--format gguf writes the layout of the GGUF the model was loaded from; "
                     f"--model {model} was not loaded from a GGUF (use --model smollm2, or "
                     "--format hf).")
  variables = merged_variables(saved, base.params)
  output_dir = Path(output_dir)
  written = {}
  if "hf" in formats:
    written["hf"] = _hf_checkpoint.save_hf_checkpoint(output_dir / "hf", base.module, variables,
                                                      tokenizer=base.tokenizer)
  if "gguf" in formats:
    written["gguf"] = _gguf_export.save_gguf(output_dir / "model.gguf", base.module, variables,
                                             source=base.gguf_source, tensor_type=tensor_type)
  return written
