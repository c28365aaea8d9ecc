"""PEFT-format adapters: save a learned jaxrank adapter for PyTorch, load a PEFT LoRA back.

``save_peft_adapter`` compacts the adapter first (dead ranks dropped, gates folded in; what
:func:`jaxrank.compact` returned, a plain LoRA of scale 1, is written as it is), then
writes ``adapter_model.safetensors`` and ``adapter_config.json`` in the layout
``peft.PeftModel.from_pretrained`` reads: for every adapted ``nn.Dense`` with rank ``r_i > 0``,
``base_model.model.<module>.lora_A.weight`` (``r_i x in``) and ``...lora_B.weight``
(``out x r_i``), with ``rank_pattern[module] = r_i``. Layers whose every rank died are left
out of ``target_modules`` (and of the file). Module names are the Flax paths with ``/``
replaced by ``.``, which is the PyTorch name for Hugging Face models
(``bert.encoder.layer.0.attention.self.query``).

**The serving-safe rule.** Serving engines read only ``r``, ``lora_alpha`` (and
``use_rslora``) from the config and scale every module by one ``lora_alpha / r`` (vLLM drops
``rank_pattern``/``alpha_pattern`` and zero-pads each module's factors to ``r``). So the file
is written such that every reader computes the same ``ΔW``:

* jaxrank's scale (and the gates) are folded into ``lora_B`` (what ``compact`` does), so each
  module's update is exactly ``lora_B @ lora_A``;
* ``alpha_pattern[module] = rank_pattern[module] = r_i``: PEFT's per-module scale
  ``alpha_i / r_i`` is 1;
* ``r`` is the largest live rank and ``lora_alpha = r``, ``use_rslora = False``: a loader
  reading only ``r``, ``lora_alpha`` and the tensor shapes also scales by ``r / r = 1``, and
  padding a module's factors with zero ranks up to ``r`` does not change ``lora_B @ lora_A``.

Fully trained modules (a fresh classifier and pooler) go in as PEFT ``modules_to_save``: their
full PyTorch names (``bert.pooler.dense``, ``classifier``; PEFT matches names by suffix, so a
bare ``dense`` would catch every dense layer) and their weights in PyTorch layout.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4, name="proj"), adapter=jaxrank.LoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> directory = tempfile.mkdtemp()
  >>> config = jaxrank.save_peft_adapter(directory, model, variables, module_name=lambda p: "proj")
  >>> config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]
  (2, 2.0, {'proj': 2}, {'proj': 2.0})
  >>> adapter, lora = jaxrank.load_peft_adapter(directory, module_path=lambda n: n)
  >>> lora["proj"]["A"].shape
  (3, 2)
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
from flax import traverse_util

from jaxrank import _adapter
from jaxrank import _torch_layout
from jaxrank import _tree
from jaxrank import export

_PREFIX = "base_model.model."


def _default_module_name(path: str) -> str:
  return path.replace("/", ".")


def save_peft_adapter(
    directory,
    model,
    variables,
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
    module_name: Callable[[str], str] = _default_module_name,
    modules_to_save: Sequence[str] = (),
) -> dict:
  """Writes a PEFT LoRA adapter directory and returns its config dict.

  Args:
    directory: created if missing.
    model: the module returned by :func:`jaxrank.wrap` (any method's adapter), or the plain-LoRA
      model that :func:`jaxrank.compact` returned (then it is not compacted again).
    variables: its variables.
    base_model_name_or_path: recorded in the config for PEFT.
    task_type: PEFT task type, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
    module_name: maps a Flax layer path (``a/b/c``) to the PyTorch module name.
    modules_to_save: Flax paths of layers trained in full (a fresh task head such as
      ``"classifier"``, ``"bert/pooler/dense"``); every leaf under them in
      ``variables['params']`` is saved in PyTorch layout (``kernel`` transposed to ``weight``,
      ``bias``; LayerNorm ``scale``/embedding ``embedding`` as ``weight``) and the module is
      listed in ``modules_to_save`` under its full PyTorch name.

  Raises:
    ValueError: for a layer PEFT's ``Linear`` LoRA cannot hold, two layers with one PyTorch
      name, an adapter whose every rank is dead, or a ``modules_to_save`` path that is not in
      ``params``.
  """
  from safetensors.numpy import save_file  # the 'hf' extra

  plain, compacted = _plain_lora(model, variables)
  tensors, rank_pattern, alpha_pattern, owners = {}, {}, {}, {}
  for path, layer in _tree.adapter_layers(plain, compacted).items():
    if layer.stacked_axes or len(layer.in_shape) != 1 or len(layer.out_shape) != 1:
      raise ValueError(
          f"lora/{path} is not a plain 2-D nn.Dense adapter (stacked by nn.scan, or "
          "DenseGeneral/Einsum with several axes); PEFT's Linear LoRA cannot hold it. Merge it "
          "with jaxrank.merge instead."
      )
    rank = layer.down.shape[-1]
    if rank == 0:
      continue
    name = module_name(path)
    if name in owners:
      raise ValueError(
          f"save_peft_adapter: module_name maps both lora/{owners[name]} and lora/{path} to "
          f"{name!r}; each adapted layer needs its own PyTorch module name (the default "
          f"replaces '/' by '.').")
    owners[name] = path
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(layer.down, np.float32).T)
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(layer.up, np.float32).T)
    rank_pattern[name] = rank
    alpha_pattern[name] = float(rank)  # scale 1: folded into lora_B
  if not rank_pattern:
    raise ValueError("Every rank of every layer is dead: there is no adapter to export.")
  saved_modules = []
  for path in modules_to_save:
    name = module_name(path)
    try:
      head = _torch_layout.torch_tensors(variables["params"], path)
    except ValueError as error:
      raise ValueError(f"modules_to_save: {error}") from None
    tensors.update({f"{_PREFIX}{name}.{k}": v for k, v in head.items()})
    saved_modules.append(name)
  if task_type == "SEQ_CLS" and not {"classifier", "score"} & {
      n.rsplit(".", 1)[-1] for n in saved_modules}:
    raise ValueError(
        "task_type='SEQ_CLS': PEFT then loads the head ('classifier' or 'score') from the "
        "adapter file, so it must be saved: pass modules_to_save=['classifier'] (its Flax "
        "path).")
  max_rank = max(rank_pattern.values())
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": max_rank,
      "lora_alpha": float(max_rank),
      "use_rslora": False,
      "use_dora": False,
      "lora_dropout": float(plain.dropout),
      "target_modules": sorted(rank_pattern),
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "modules_to_save": saved_modules or None,
  }
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return config


def _plain_lora(model, variables) -> tuple[_adapter.LoRA, dict]:
  """A plain LoRA of scale 1 over the live ranks: ``model`` itself if it is one already.

  :func:`jaxrank.compact` returns exactly that (gates and scale folded into ``B``); compacting
  it again would copy every factor unchanged.
  """
  adapter = _tree.adapter_spec(model)
  if type(adapter) is _adapter.LoRA and adapter.scale == 1.0:
    return adapter, variables
  lora_model, compacted, _ = export.compact(model, variables)
  return _tree.adapter_spec(lora_model), compacted


def _default_module_path(name: str) -> str:
  return name.replace(".", "/")


def load_peft_adapter(
    directory, *, module_path: Callable[[str], str] = _default_module_path
) -> tuple[_adapter.LoRA, dict]:
  """Reads a PEFT LoRA adapter into jaxrank's layout.

  Returns:
    ``(adapter, lora)``: a :class:`jaxrank.LoRA` spec and the ``lora`` collection for a model
    wrapped with it (``targets`` = the adapter's layers). PEFT's per-module ``alpha / r`` is
    folded into ``B`` so one spec (scale 1) serves every rank.
  """
  from safetensors.numpy import load_file

  with open(os.path.join(directory, "adapter_config.json")) as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter; only LORA loads.")
  if config.get("use_dora") or config.get("use_rslora"):
    raise ValueError("DoRA and rsLoRA adapters are not supported by load_peft_adapter.")
  tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  flat = {}
  max_rank = 1
  for key, value in tensors.items():
    if not key.endswith(".lora_A.weight"):
      continue
    name = key[len(_PREFIX):-len(".lora_A.weight")] if key.startswith(_PREFIX) else key[:-len(".lora_A.weight")]
    down = value.T
    b_key = key.replace(".lora_A.weight", ".lora_B.weight")
    if b_key not in tensors:
      raise ValueError(
          f"{directory}/adapter_model.safetensors: module {name!r} has lora_A but no lora_B "
          f"({b_key!r} is missing): the file is incomplete; re-export the adapter.")
    up = tensors[b_key].T
    rank = down.shape[-1]
    alpha = next((a for pattern, a in alpha_pattern.items() if _matches(pattern, name)),
                 config.get("lora_alpha"))
    declared = next((r for pattern, r in rank_pattern.items() if _matches(pattern, name)),
                    config.get("r", rank))
    if alpha is None:
      raise ValueError(
          f"{directory}/adapter_config.json has no 'lora_alpha' (and no alpha_pattern entry "
          f"for module {name!r}): jaxrank needs it for the alpha / r scaling. Add "
          f"\"lora_alpha\" to the config (PEFT's default is 8).")
    if declared != rank:
      raise ValueError(f"{name}: rank_pattern says {declared} but lora_A has rank {rank}.")
    path = _tree.key_tuple(module_path(name))
    flat[path + ("A",)] = down
    flat[path + ("B",)] = up * (alpha / rank)
    max_rank = max(max_rank, rank)
  if not flat:
    raise ValueError(f"No lora_A weights in {directory}/adapter_model.safetensors.")
  return _adapter.LoRA(rank=max_rank, alpha=float(max_rank)), traverse_util.unflatten_dict(flat)


def _matches(pattern: str, name: str) -> bool:
  return name == pattern or name.endswith("." + pattern)
