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

from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _tree
from jaxrank._tree import adapter_layers  # noqa: F401  (public: jaxrank.adapter_layers)
from jaxrank._tree import AdapterLayer  # noqa: F401  (public: jaxrank.AdapterLayer)
from jaxrank._tree import rank_masks  # noqa: F401  (public: jaxrank.rank_masks)

TRAINABLE_COLLECTIONS = ("lora", "gates")

Variables = Mapping[str, Any]


def split_variables(variables: Variables) -> tuple[dict, dict]:
  """Splits variables into ``(frozen, trainable)``: trainable holds ``lora`` and ``gates``."""
  variables = _tree.plain(variables)
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
  return {**_tree.plain(frozen), **_tree.plain(trainable)}


def collection_labels(variables: Variables) -> dict:
  """A tree of the same structure whose leaves are their collection's name.

  Use it as ``param_labels`` of ``optax.partition`` (it accepts the function itself).
  """
  return {
      collection: jax.tree.map(lambda _, c=collection: c, tree)
      for collection, tree in _tree.plain(variables).items()
  }


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
      for collection, tree in _tree.plain(variables).items()
  }


def effective_parameter_count(model_or_adapter, variables: Variables) -> int:
  """The scalars a plain LoRA of the learned ranks needs: ``Σ live_rank · (fan_in + fan_out)``."""
  adapter = _tree.adapter_spec(model_or_adapter)
  masks = rank_masks(adapter, variables)
  total = 0
  for path, layer in adapter_layers(adapter, variables).items():
    fan_in, fan_out = int(np.prod(layer.in_shape)), int(np.prod(layer.out_shape))
    total += int(jnp.sum(masks[path])) * (fan_in + fan_out)
  return total


# scalars that live in ``gates`` but are method state, not trained parameters: SaLoRA's
# Lagrange multiplier λ (set by projected ascent) and its task-loss EMA (jaxrank._lagrangian)
METHOD_STATE_LEAVES = ("lagrange_multiplier", "loss_scale")


def trainable_parameter_count(variables: Variables) -> int:
  """Scalars in ``lora`` and ``gates`` that the optimizer trains: SaLoRA's Lagrange multiplier
  and loss-scale EMA (:data:`METHOD_STATE_LEAVES`) are method state and not counted."""
  plain = _tree.plain(variables)
  total = 0
  for collection in TRAINABLE_COLLECTIONS:
    tree = plain.get(collection, {})
    if collection == "gates" and isinstance(tree, Mapping):
      tree = {k: v for k, v in tree.items() if k not in METHOD_STATE_LEAVES}
    total += int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
  return total

