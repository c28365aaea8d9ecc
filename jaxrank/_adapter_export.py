"""Writing a trained adapter to disk: pruned plain-LoRA factors, the head and a config.

:func:`export_adapter` is what ``jaxrank finetune`` writes under ``adapter/``; it is reachable
as ``jaxrank.train.export_adapter``. :func:`load_adapter` reads that folder back (what
``jaxrank export`` merges into the base model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from flax import traverse_util

from jaxrank import _adapter
from jaxrank import _tree
from jaxrank import export
from jaxrank._heads import HEAD


def _flat_tensors(prefix: str, tree) -> dict:
  return {prefix + "/".join(key): np.asarray(value)
          for key, value in traverse_util.flatten_dict(_tree.plain(tree)).items()}


# PEFT task types by the Hugging Face model class the module belongs to (Flax: ``Flax<Name>Module``)
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def peft_task_type(model) -> Optional[str]:
  """PEFT's ``task_type`` of a (wrapped) Hugging Face Flax module, from its class name; None
  for other models.

  >>> import transformers
  >>> peft_task_type(transformers.FlaxBertForSequenceClassification.module_class(
  ...     transformers.BertConfig()))
  'SEQ_CLS'
  """
  base = getattr(model, "wrapped_model", model)
  names = [cls.__name__ for cls in type(base).__mro__]
  return next((task for name in names for suffix, task in _TASK_TYPES if suffix in name), None)


def head_modules(head_tree) -> list[str]:
  """The Flax paths of the layers holding the trained head's leaves (``classifier``,
  ``bert/pooler/dense``), in order.

  >>> head_modules({"classifier": {"kernel": 0, "bias": 0}, "bert": {"pooler": {"dense": {"kernel": 0}}}})
  ['classifier', 'bert/pooler/dense']
  """
  flat = traverse_util.flatten_dict(_tree.plain(head_tree or {}))
  return list(dict.fromkeys("/".join(key[:-1]) for key in flat))


def export_adapter(result, directory, *, extra_config: Optional[dict] = None,
                   task_type: Optional[str] = None,
                   base_model_name_or_path: Optional[str] = None):
  """Writes the trained adapter of ``result`` (a ``jaxrank.train.TrainResult``), pruned to its
  live ranks, to ``directory``.

  * ``adapter.safetensors``: the plain-LoRA factors of :func:`jaxrank.compact` (gates and
    scale folded into ``B``, dead ranks dropped) under ``lora/<path>/A|B`` and the task head
    under ``head/<path>``;
  * ``adapter_config.json``: method, rank per layer, scale, parameter counts;
  * ``peft/``: the same compacted adapter in PEFT's format (:func:`jaxrank.save_peft_adapter`)
    with the trained head (every layer of ``trainable['head']``: the classifier, a fresh
    pooler) as ``modules_to_save`` and ``task_type`` (default: from the Hugging Face class,
    :func:`peft_task_type`), so ``peft.PeftModel.from_pretrained`` on the PyTorch model gives
    jaxrank's outputs. Module names are the Flax paths with ``.`` (PyTorch's names for
    Hugging Face models).

  The adapter is compacted once; both formats hold the same factors. Returns the directory.
  The frozen-model baseline writes only the head.
  """
  from safetensors.numpy import save_file  # the 'hf' extra
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  config = {"method": result.method.name, "rank_pattern": {}, "scale": None}
  compacted = None
  if result.method.adapter is not None:
    compacted = export.compact(result.model, result.variables)
    lora_model, lora_vars, pattern = compacted
    tensors.update(_flat_tensors("lora/", lora_vars["lora"]))
    config.update(rank_pattern=pattern, scale=float(lora_model.adapter.scale),
                  alpha=float(lora_model.adapter.alpha), rank=int(lora_model.adapter.rank),
                  effective_parameters=int(sum(np.size(v) for v in tensors.values())))
  tensors.update(_flat_tensors("head/", result.state.trainable.get(HEAD, {})))
  config["head_parameters"] = result.head_parameters
  config.update(extra_config or {})
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(directory / "adapter.safetensors"))
  if compacted is not None and any(result.rank_pattern.values()):
    from jaxrank import peft_io
    head = result.state.trainable.get(HEAD, {})
    peft_io.save_peft_adapter(
        directory / "peft", compacted[0], compacted[1],
        task_type=task_type or peft_task_type(result.model),
        base_model_name_or_path=base_model_name_or_path, modules_to_save=head_modules(head))
  (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return directory


class SavedAdapter(NamedTuple):
  """What :func:`load_adapter` reads: the plain-LoRA spec (None for the frozen baseline), the
  ``lora`` collection, the trained head (``params`` paths) and the config dict."""

  adapter: Optional[_adapter.LoRA]
  lora: dict
  head: dict
  config: dict


def load_adapter(directory) -> SavedAdapter:
  """Reads a folder written by :func:`export_adapter` (``adapter.safetensors`` and
  ``adapter_config.json``).

  ``jaxrank.merge(saved.adapter, {"params": params_with_head, "lora": saved.lora})`` gives the
  trained model's merged params.
  """
  from safetensors.numpy import load_file
  directory = Path(directory)
  missing = [name for name in ("adapter.safetensors", "adapter_config.json")
             if not (directory / name).is_file()]
  if missing:
    raise ValueError(f"{directory} has no {' or '.join(missing)}: pass the adapter/ folder "
                     "that jaxrank finetune writes (or the run folder above it).")
  config = json.loads((directory / "adapter_config.json").read_text())
  flat = load_file(str(directory / "adapter.safetensors"))
  tree = lambda prefix: traverse_util.unflatten_dict(
      {tuple(k[len(prefix):].split("/")): v for k, v in flat.items() if k.startswith(prefix)})
  lora = tree("lora/")
  adapter = None
  if lora:
    adapter = _adapter.LoRA(rank=int(config["rank"]), alpha=float(config["alpha"]))
  return SavedAdapter(adapter, lora, tree("head/"), config)
