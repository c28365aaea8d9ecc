"""Helpers over a wrapped model's variables: split, labels, rank patterns, counts.

The variables of a wrapped model are ``{'params': base, 'lora': factors, 'gates': gates}``
(``gates`` is absent for plain LoRA). Adapter paths mirror base paths, so a layer is named by
its ``/``-joined path, e.g. ``'encoder/layer/0/attention/self/query'``.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.LoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> frozen, trainable = jaxrank.split_variables(variables)
  >>> sorted(frozen), sorted(trainable)
  (['params'], ['lora'])
  >>> jaxrank.rank_pattern(model, variables)
  {'': 2}
  >>> tx = optax.partition({"params": optax.set_to_zero(), "lora": optax.adam(1e-3)},
  ...                      jaxrank.collection_labels)
  >>> state = tx.init(variables)
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxrank import _adapter

TRAINABLE_COLLECTIONS = ("lora", "gates")

Variables = Mapping[str, Any]


def _plain(tree):
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)


def split_variables(variables: Variables) -> tuple[dict, dict]:
  """Splits variables into ``(frozen, trainable)``: trainable holds ``lora`` and ``gates``."""
  variables = _plain(variables)
  trainable = {k: v for k, v in variables.items() if k in TRAINABLE_COLLECTIONS}
  frozen = {k: v for k, v in variables.items() if k not in TRAINABLE_COLLECTIONS}
  if "lora" not in trainable:
    raise ValueError(
        "These variables hold no 'lora' collection. Use the variables returned by "
        "`jaxrank.wrap(model, ...).init(...)`."
    )
  return frozen, trainable


def join_variables(frozen: Variables, trainable: Variables) -> dict:
  """The inverse of :func:`split_variables`."""
  return {**_plain(frozen), **_plain(trainable)}


def collection_labels(variables: Variables) -> dict:
  """A tree of the same structure whose leaves are their collection's name.

  Use it as ``param_labels`` of ``optax.partition`` (it accepts the function itself).
  """
  return {
      collection: jax.tree.map(lambda _, c=collection: c, tree)
      for collection, tree in _plain(variables).items()
  }


class AdapterLayer(NamedTuple):
  """One adapted layer's variables."""

  down: jax.Array
  up: jax.Array
  gates: dict
  # leading axes added by nn.scan/nn.vmap (0 for an ordinary layer)
  stacked_axes: int

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.down.shape[self.stacked_axes:-1])

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.up.shape[self.stacked_axes + 1:])


def _spec(model_or_adapter) -> _adapter.LoRA:
  adapter = getattr(model_or_adapter, "adapter", model_or_adapter)
  if not isinstance(adapter, _adapter.LoRA):
    raise TypeError(
        "Expected a model returned by jaxrank.wrap or an adapter spec such as jaxrank.LoRA(), "
        f"got {type(model_or_adapter).__name__}."
    )
  return adapter


def adapter_layers(model_or_adapter, variables: Variables) -> dict[str, AdapterLayer]:
  """Every adapted layer, by ``/``-joined path, in path order."""
  adapter = _spec(model_or_adapter)
  if "lora" not in variables:
    raise ValueError("These variables hold no 'lora' collection (see jaxrank.wrap).")
  flat = traverse_util.flatten_dict(_plain(variables["lora"]))
  flat_gates = traverse_util.flatten_dict(_plain(variables.get("gates", {})))
  flat_params = traverse_util.flatten_dict(_plain(variables.get("params", {})))
  layers = {}
  for key in sorted(flat):
    if key[-1] != adapter.down_name:
      continue
    prefix = key[:-1]
    up = flat.get(prefix + (adapter.up_name,))
    if up is None:
      raise ValueError(f"lora/{'/'.join(key)} has no matching {adapter.up_name!r} factor.")
    gates = {name: flat_gates[prefix + (name,)] for name in adapter.gate_names
             if prefix + (name,) in flat_gates}
    missing = set(adapter.gate_names) - set(gates)
    if missing:
      raise ValueError(
          f"gates/{'/'.join(prefix)} lacks {sorted(missing)} needed by {type(adapter).__name__}: "
          "were these variables made with another adapter spec?"
      )
    down = flat[key]
    kernel = flat_params.get(prefix + ("kernel",))
    if kernel is not None:
      stacked_axes = down.ndim + up.ndim - 2 - kernel.ndim
    elif gates:
      stacked_axes = next(iter(gates.values())).ndim - 1
    else:
      stacked_axes = 0
    layers["/".join(prefix)] = AdapterLayer(down, up, gates, stacked_axes)
  if not layers:
    raise ValueError(
        f"No {type(adapter).__name__} adapters (factors {adapter.down_name!r}/{adapter.up_name!r}) "
        "in these variables: were they made with another adapter spec?"
    )
  return layers


def rank_masks(model_or_adapter, variables: Variables) -> dict[str, jax.Array]:
  """Per layer, a bool per rank: True where the rank is alive (shape ``(..., rank)``)."""
  adapter = _spec(model_or_adapter)
  masks = {}
  for path, layer in adapter_layers(adapter, variables).items():
    if layer.gates:
      masks[path] = adapter.rank_mask(layer.gates)
    else:
      masks[path] = jnp.ones(layer.down.shape[: layer.stacked_axes] + layer.down.shape[-1:], bool)
  return masks


def rank_pattern(model_or_adapter, variables: Variables) -> dict[str, Union[int, list]]:
  """The effective rank of every adapted layer (a list for layers stacked by ``nn.scan``)."""
  pattern = {}
  for path, mask in rank_masks(model_or_adapter, variables).items():
    counts = np.asarray(jnp.sum(mask, axis=-1))
    pattern[path] = int(counts) if counts.ndim == 0 else counts.tolist()
  return pattern


def count_parameters(variables: Variables) -> dict[str, int]:
  """The number of scalars in each collection, e.g. ``{'params': ..., 'lora': ...}``."""
  return {
      collection: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
      for collection, tree in _plain(variables).items()
  }


def effective_parameter_count(model_or_adapter, variables: Variables) -> int:
  """The scalars a plain LoRA of the learned ranks needs: ``Σ live_rank · (fan_in + fan_out)``."""
  adapter = _spec(model_or_adapter)
  masks = rank_masks(adapter, variables)
  total = 0
  for path, layer in adapter_layers(adapter, variables).items():
    fan_in, fan_out = int(np.prod(layer.in_shape)), int(np.prod(layer.out_shape))
    total += int(jnp.sum(masks[path])) * (fan_in + fan_out)
  return total


def trainable_parameter_count(variables: Variables) -> int:
  """Scalars in ``lora`` and ``gates`` (what the optimizer trains)."""
  counts = count_parameters(variables)
  return sum(counts.get(c, 0) for c in TRAINABLE_COLLECTIONS)

