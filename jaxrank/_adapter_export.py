"""Writing a trained adapter to disk: pruned plain-LoRA factors, the head and a config.

:func:`export_adapter` is what ``jaxrank finetune`` writes under ``adapter/``; it is reachable
as ``jaxrank.train.export_adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from flax import traverse_util

from jaxrank import _tree
from jaxrank import export
from jaxrank._heads import HEAD


def _flat_tensors(prefix: str, tree) -> dict:
  return {prefix + "/".join(key): np.asarray(value)
          for key, value in traverse_util.flatten_dict(_tree.plain(tree)).items()}


def export_adapter(result, directory, *, extra_config: Optional[dict] = None):
  """Writes the trained adapter of ``result`` (a ``jaxrank.train.TrainResult``), pruned to its
  live ranks, to ``directory``.

  * ``adapter.safetensors``: the plain-LoRA factors of :func:`jaxrank.compact` (gates and
    scale folded into ``B``, dead ranks dropped) under ``lora/<path>/A|B`` and the task head
    under ``head/<path>``;
  * ``adapter_config.json``: method, rank per layer, scale, parameter counts;
  * ``peft/``: the same compacted adapter in PEFT's format (:func:`jaxrank.save_peft_adapter`),
    when the model's layer paths are PyTorch module names (Hugging Face models).

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
    peft_io.save_peft_adapter(directory / "peft", compacted[0], compacted[1])
  (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return directory
