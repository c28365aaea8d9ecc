"""The merged model as a Hugging Face PyTorch-format checkpoint (``from_pretrained`` loads it).

:func:`save_hf_checkpoint` folds every adapter into its kernel (:func:`jaxrank.merge`) and
writes the folder ``transformers.AutoModel*.from_pretrained`` reads, without torch:

* ``model.safetensors``: every parameter under its PyTorch name and layout
  (:mod:`jaxrank._torch_layout`: ``bert.encoder.layer.0.attention.self.query.weight`` as
  ``(out, in)``; ``model.layers.0.self_attn.q_proj.weight`` for LLaMA), float32. A tied
  LLaMA (``tie_word_embeddings``) whose merged ``lm_head`` still equals the transposed
  embedding is written without ``lm_head.weight``, as transformers saves it; one whose
  ``lm_head`` was adapted is written untied, with both matrices;
* ``config.json``: the model's ``transformers`` config with ``architectures`` set to the
  PyTorch class (``BertForSequenceClassification``, ``LlamaForCausalLM``);
* the tokenizer: files copied from a folder, or a ``tokenizers.Tokenizer`` / transformers
  tokenizer saved with ``save_pretrained``.

Example:
  >>> import tempfile, jax, transformers, jaxrank
  >>> config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
  ...     num_attention_heads=2, intermediate_size=16, num_labels=2)
  >>> hf = transformers.FlaxBertForSequenceClassification(config, seed=0)
  >>> model = jaxrank.wrap(hf.module, targets=["query"], adapter=jaxrank.LoRA(rank=2))
  >>> variables = {"params": hf.params, "lora": model.init(jax.random.key(0), *[jax.numpy.ones(
  ...     (1, 4), "int32")] * 4, None)["lora"]}
  >>> folder = jaxrank.save_hf_checkpoint(tempfile.mkdtemp(), model, variables)
  >>> sorted(p.name for p in folder.iterdir())
  ['config.json', 'model.safetensors']
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jaxrank import _adapter
from jaxrank import _torch_layout
from jaxrank import _tree
from jaxrank import export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")


def merged_params(model, variables) -> dict:
  """``variables['params']`` with every adapter folded in (the unwrapped model's params);
  ``variables['params']`` itself for a model without adapters."""
  if not isinstance(getattr(model, "adapter", None), _adapter.LoRA) or "lora" not in variables:
    return _tree.plain(variables)["params"]
  return export.merge(model, variables)


def _base_module(model):
  return getattr(model, "wrapped_model", model)


def pytorch_architecture(model) -> str:
  """The transformers PyTorch class of a Hugging Face Flax module (``FlaxBertFor...Module`` ->
  ``BertFor...``; a subclass of one counts as it)."""
  for cls in type(_base_module(model)).__mro__:
    if cls.__name__.startswith("Flax") and cls.__name__.endswith("Module") and \
        cls.__name__ != "FlaxModule":
      return cls.__name__[len("Flax"):-len("Module")]
  raise ValueError(f"save_hf_checkpoint: {type(_base_module(model)).__name__} is not a Hugging "
                   "Face Flax module (Flax<Name>Module); pass config= and architecture= for "
                   "other models.")


def save_hf_checkpoint(directory, model, variables, *, config: Any = None,
                       architecture: Optional[str] = None, tokenizer: Any = None) -> Path:
  """Writes the merged model as a Hugging Face PyTorch-format folder; returns its path.

  Args:
    directory: the folder (created if missing).
    model: the model returned by :func:`jaxrank.wrap` over a Hugging Face Flax module
      (``hf_model.module``), or that module itself.
    variables: its variables (``params`` with the trained head, ``lora``, ``gates``).
    config: the ``transformers.PretrainedConfig`` (default: the module's ``config``).
    architecture: the PyTorch class name for ``config.architectures`` (default: from the
      Flax class, :func:`pytorch_architecture`).
    tokenizer: a folder whose tokenizer files (:data:`TOKENIZER_FILES`) are copied, a
      ``tokenizers.Tokenizer`` (saved as a ``PreTrainedTokenizerFast``) or an object with
      ``save_pretrained``; None writes no tokenizer.
  """
  from safetensors.numpy import save_file  # the 'hf' extra
  directory = Path(directory)
  config = copy.deepcopy(config if config is not None else getattr(_base_module(model), "config"))
  config.architectures = [architecture or pytorch_architecture(model)]
  tensors = _torch_layout.torch_tensors(merged_params(model, variables))
  if "lm_head.weight" in tensors and getattr(config, "tie_word_embeddings", False):
    embedding = next((v for k, v in tensors.items() if k.endswith("embed_tokens.weight")), None)
    if embedding is not None and np.array_equal(embedding, tensors["lm_head.weight"]):
      del tensors["lm_head.weight"]  # tied: transformers ties it to the embedding again
    else:
      config.tie_word_embeddings = False  # the adapted lm_head is its own matrix now
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  config.save_pretrained(str(directory))
  if tokenizer is not None:
    _save_tokenizer(tokenizer, directory)
  return directory


def _save_tokenizer(tokenizer, directory: Path):
  if isinstance(tokenizer, (str, Path)):
    source = Path(tokenizer)
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not files:
      raise ValueError(f"tokenizer={source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) "
                       "in this folder; pass the model folder that holds them.")
    for path in files:
      shutil.copy2(path, directory / path.name)
    return
  if not hasattr(tokenizer, "save_pretrained"):
    import transformers
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
  tokenizer.save_pretrained(str(directory))
