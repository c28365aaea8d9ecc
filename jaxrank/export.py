"""Export: fold adapters into base kernels (``merge``) or drop dead ranks (``compact``).

``merge`` returns plain ``params`` for the *unwrapped* model: every kernel becomes
``W + scale · down · diag(gate) · up`` (ΔW of the adapter, in the kernel's own layout).

``compact`` returns the variables of a *plain LoRA* whose rank per layer is the number of live
ranks (SoRA post-pruning, eq. 12 of the SoRA paper: drop the zero entries of g and fold g into
W_u); the compacted model computes the same function as the gated one.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.LoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> params = jaxrank.merge(model, variables)
  >>> params["kernel"].shape
  (3, 4)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxrank import _adapter
from jaxrank import _tree
from jaxrank import _variables


def _delta(adapter: _adapter.LoRA, layer: _tree.AdapterLayer) -> jax.Array:
  gate = adapter.effective_gate(layer.gates) if layer.gates else None
  fn = lambda down, up, gate: _adapter.delta_kernel(down, up, gate, adapter.scale)
  for _ in range(layer.stacked_axes):
    fn = jax.vmap(fn)
  with jax.default_matmul_precision("highest"):
    return fn(layer.down.astype(jnp.float32), layer.up.astype(jnp.float32), gate)


def _merged_params(adapter: _adapter.LoRA, variables) -> dict:
  params = traverse_util.flatten_dict(_tree.plain(variables["params"]))
  for path, layer in _tree.adapter_layers(adapter, variables).items():
    key = _tree.key_tuple(path) + ("kernel",)
    if key not in params:
      raise ValueError(f"params/{_tree.path_key(key)} does not exist: cannot merge lora/{path}.")
    kernel = params[key]
    delta = _delta(adapter, layer)
    if delta.shape != kernel.shape:
      raise ValueError(
          f"lora/{path} gives an update of shape {delta.shape} but the kernel is {kernel.shape}."
      )
    params[key] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(params)


def _is_concrete(x) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def merge(model, variables) -> dict:
  """Folds every adapter into its base kernel and returns plain ``params``.

  Args:
    model: the module returned by :func:`jaxrank.wrap` (or its adapter spec).
    variables: the wrapped model's variables (``params``, ``lora``, ``gates``).

  Returns:
    ``params`` for the unwrapped model. Runs under ``jit``; called on concrete arrays it jits
    itself and keeps each base leaf's sharding.
  """
  adapter = _tree.adapter_spec(model)
  fn = functools.partial(_merged_params, adapter)
  leaves = jax.tree.leaves(variables)
  if leaves and all(_is_concrete(x) for x in leaves):
    out_shardings = jax.tree.map(lambda x: x.sharding, _tree.plain(variables["params"]))
    return jax.jit(fn, out_shardings=out_shardings)(_tree.plain(variables))
  return fn(variables)


def compact(model, variables, *, alpha: Any = None):
  """Drops dead ranks and returns ``(plain_lora_model, variables, rank_pattern)``.

  The gate (SoRA g, AdaLoRA Λ, SaLoRA's deterministic gate, ALoRA mask) and the scale are
  folded into the up factor, so ``scale_new · down' · up' == scale · down · diag(gate) · up``
  exactly on the surviving ranks. Layers stacked by ``nn.scan`` keep the ranks alive in any of
  their stacked copies (shapes must agree along the stack).

  Args:
    model: the module returned by :func:`jaxrank.wrap`.
    variables: its variables.
    alpha: the ``alpha`` of the returned plain ``LoRA`` spec; by default it equals the spec's
      ``rank`` so that its scale is 1.

  Returns:
    ``(lora_model, lora_variables, rank_pattern)``: a model wrapped with a plain
    :class:`jaxrank.LoRA` (same targets), its variables (``params`` and ``lora``; no ``gates``)
    and the rank of every layer. Runs outside ``jit`` (shapes change).
  """
  adapter = _tree.adapter_spec(model)
  layers = _tree.adapter_layers(adapter, variables)
  masks = _tree.rank_masks(adapter, variables)
  # a stacked (nn.scan) layer keeps every rank alive in any of its copies
  alive_ranks = {path: np.flatnonzero(np.asarray(m).reshape(-1, m.shape[-1]).any(axis=0))
                 for path, m in masks.items()}
  max_rank = max(1, max(len(alive) for alive in alive_ranks.values()))
  plain = _adapter.LoRA(
      rank=max_rank,
      alpha=float(max_rank) if alpha is None else alpha,
      dropout=adapter.dropout,
      dtype=adapter.dtype,
      param_dtype=adapter.param_dtype,
  )
  new_lora = {}
  pattern = {}
  for path, layer in layers.items():
    alive = alive_ranks[path]
    gate = adapter.effective_gate(layer.gates) if layer.gates else None
    up = layer.up.astype(jnp.float32) * (adapter.scale / plain.scale)
    if gate is not None:
      up = up * gate.reshape(gate.shape + (1,) * len(layer.out_shape))
    down = jnp.take(layer.down, alive, axis=layer.stacked_axes + len(layer.in_shape))
    up = jnp.take(up, alive, axis=layer.stacked_axes).astype(layer.up.dtype)
    key = _tree.key_tuple(path)
    new_lora[key + (plain.down_name,)] = down
    new_lora[key + (plain.up_name,)] = up
    pattern[path] = int(alive.size)
  new_variables = {
      k: v for k, v in _tree.plain(variables).items()
      if k not in _variables.TRAINABLE_COLLECTIONS
  }
  new_variables["lora"] = traverse_util.unflatten_dict(new_lora)
  lora_model = model.clone(adapter=plain) if hasattr(model, "clone") else plain
  return lora_model, new_variables, pattern
