"""ALoRA's prune-and-reallocate step (Liu et al., NAACL 2024, §3.3, footnotes 2–3).

One round prunes the ``n_A`` live ranks of lowest AB-LoRA importance (gate → 0) and gives the
freed ranks to the modules that lost none, as evenly as possible, the remainder to the modules
of highest mean importance. With ``keep_budget=True`` (the default, jaxrank's) the ranks those
receivers have no room for go to the other modules live this round, so ``Σ added = Σ pruned``;
``keep_budget=False`` is the paper's rule (they are lost). A new rank takes a free slot: ``A``
re-initialised, ``B = 0``, gate 1, so the network's function does not change;
:func:`alora_reset_optimizer_state` then resets the inner optimizer's state of those slots.
Gates are written as exact 0/1. Everything is a pure function of arrays and runs under ``jit``
(:func:`reallocation_plan` works on flat, module-major arrays).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(2), adapter=jaxrank.ALoRA(rank=3, initial_rank=2))
  >>> v = model.init(jax.random.key(0), jnp.ones((4, 3)))
  >>> scores = {"": jnp.array([0.5, 0.1, jnp.nan])}
  >>> paper, info = jaxrank.prune_and_reallocate(model, v, scores, rng=jax.random.key(1),
  ...                                            keep_budget=False)
  >>> info.pruned[""].tolist(), paper["gates"]["mask"].tolist()   # no other module to receive
  ([False, True, False], [1.0, 0.0, 0.0])
  >>> kept, info = jaxrank.prune_and_reallocate(model, v, scores, rng=jax.random.key(1))
  >>> info.added[""].tolist(), kept["gates"]["mask"].tolist()   # a fresh rank in slot 1
  ([False, True, False], [1.0, 1.0, 0.0])
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _alora
from jaxrank import _tree

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Prune and reallocate
# --------------------------------------------------------------------------------------------


class Reallocation(NamedTuple):
  """What one round did, per layer path, as bool masks shaped like the layer's gate mask."""

  pruned: dict
  added: dict


def _inverse_permutation(order: Array) -> Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))


def reallocation_plan(flat_mask: Array, flat_scores: Array, num_prune, capacity: int, *,
                      keep_budget: bool = True):
  """The pruned and added slots of one round, on flat (module-major) arrays.

  Receivers (footnotes 2–3): the modules that lost no rank this round, with a live rank and a
  free slot, as evenly as possible, the remainder to the highest mean importance. When they
  have fewer free slots than ranks were pruned, ``keep_budget=True`` (default, jaxrank's) gives
  the rest to the other modules live this round (those that lost ranks, their pruned slots
  included), in the same order (level, then mean importance), so the total live rank never
  changes: ``Σ added = Σ pruned``. ``keep_budget=False`` is the paper's literal rule: the
  remainder is lost and the total shrinks.

  Args:
    flat_mask: 0/1 gates of every slot, ``num_modules * capacity`` long.
    flat_scores: importance per slot (``nan`` where not scored).
    num_prune: ``n_A`` (may be traced); at most the scored live slots are pruned.
    capacity: slots per module.
    keep_budget: see above.

  Returns:
    ``(pruned, added)``: bool arrays shaped like ``flat_mask``. With ``keep_budget`` a slot
    can be both (it is re-initialised as a new rank).

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxrank import reallocation_plan
    >>> mask = jnp.array([1, 1, 0, 1, 1, 0, 1, 0, 0.])       # 3 modules of capacity 3
    >>> scores = jnp.array([0, 5, jnp.nan, 4, 6, jnp.nan, 9, jnp.nan, jnp.nan])
    >>> pruned, added = reallocation_plan(mask, scores, 1, 3)
    >>> pruned.astype(int).tolist(), added.astype(int).tolist()
    ([1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 0])
  """
  n = flat_mask.size
  modules = n // capacity
  live = flat_mask != 0
  scored = live & ~jnp.isnan(flat_scores)
  key = jnp.where(scored, flat_scores, jnp.inf)
  position = _inverse_permutation(jnp.argsort(key, stable=True))
  num = jnp.minimum(jnp.asarray(num_prune, jnp.int32), jnp.sum(scored).astype(jnp.int32))
  # Prune the n_A live ranks with the lowest scores.
  pruned = scored & (position < num)

  grid = lambda v: v.reshape(modules, capacity)
  pruned_per_module = jnp.sum(grid(pruned), axis=1)
  live_per_module = jnp.sum(grid(live), axis=1)
  scored_per_module = jnp.sum(grid(scored), axis=1)
  free_per_module = capacity - live_per_module
  mean_importance = (jnp.sum(grid(jnp.where(scored, flat_scores, 0.0)), axis=1)
                     / jnp.maximum(scored_per_module, 1))
  # Footnote 2: modules with no pruned rank receive; we also need a live rank (a mean
  # importance) and a free slot.
  receiver = (pruned_per_module == 0) & (scored_per_module > 0) & (free_per_module > 0)
  # Budget keeping (jaxrank): the modules live this round that lost ranks come second; their
  # free slots include the ones just pruned.
  second = (~receiver & (scored_per_module > 0)) if keep_budget else jnp.zeros_like(receiver)
  free_after = free_per_module + pruned_per_module
  # Footnote 3: as evenly as possible, the remainder to the highest mean importance. Ticket
  # (module j, level l) means "j's (l+1)-th new rank"; taking tickets by (tier, level,
  # priority) hands out ranks round-robin in priority order, skipping modules whose slots run
  # out, the footnote's receivers first.
  priority = _inverse_permutation(
      jnp.argsort(jnp.where(receiver | second, -mean_importance, jnp.inf), stable=True))
  level = jnp.arange(capacity)[None, :]
  ticket_ok = ((receiver[:, None] & (level < free_per_module[:, None]))
               | (second[:, None] & (level < free_after[:, None])))
  tier = second[:, None].astype(jnp.int32)
  ticket_key = jnp.where(ticket_ok, (tier * capacity + level) * modules + priority[:, None],
                         2 * modules * capacity)
  ticket_position = _inverse_permutation(jnp.argsort(ticket_key.reshape(-1), stable=True))
  taken = ticket_ok.reshape(-1) & (ticket_position < jnp.sum(pruned))
  added_per_module = jnp.sum(grid(taken), axis=1)
  free = grid(~live | pruned)
  free_index = jnp.cumsum(free, axis=1) - 1
  added = free & (free_index < added_per_module[:, None])
  return pruned, added.reshape(-1)


def prune_and_reallocate(
    model_or_adapter,
    params,
    scores: Mapping[str, Array],
    *,
    num_prune: Optional[int] = None,
    rng: Array,
    keep_budget: bool = True,
):
  """One ALoRA round on ``params`` given AB-LoRA ``scores``: prune ``n_A``, add them elsewhere.

  Pruned slots get gate 0. Each added slot gets gate 1, ``A`` re-initialised by the spec's
  ``init_down`` and ``B = 0``, so the network computes the same function as the pruned one.

  Args:
    model_or_adapter: the wrapped model or its :class:`ALoRA` spec.
    params: dict holding ``lora`` and ``gates`` (trainable or full variables).
    scores: from :func:`ablation_scores` (``nan`` on dead slots).
    num_prune: ``n_A``; default one per module. With concrete params, more than the live
      ranks raises ``ValueError``; under ``jit`` it is clipped.
    rng: key for the new ``A`` columns.
    keep_budget: keep the total live rank exactly (see :func:`reallocation_plan`).

  Returns:
    ``(new_params, Reallocation(pruned, added))`` (``params``' structure kept). A slot can be
    both pruned and added (``keep_budget``): it is re-initialised as a new rank.
  """
  adapter = _alora.alora_spec(model_or_adapter)
  slots = _alora.Slots.of(adapter, params)
  num_prune = slots.num_modules if num_prune is None else num_prune
  flat = slots.flatten(slots.masks(params))
  if _alora.is_concrete(flat) and isinstance(num_prune, int):
    live = int(np.count_nonzero(np.asarray(flat)))
    if num_prune > live:
      raise ValueError(
          f"num_prune (n_A) = {num_prune} is larger than the {live} live ranks; lower n_A or "
          "the number of rounds."
      )
  if isinstance(num_prune, int) and num_prune < 0:
    raise ValueError(f"num_prune must be >= 0, got {num_prune}.")
  pruned, added = reallocation_plan(flat, slots.flatten(scores), num_prune, slots.capacity,
                                    keep_budget=keep_budget)
  # exact 0/1 (a leaf decayed by the inner optimizer, e.g. 0.95, is snapped back to 1)
  new_flat = jnp.where(added | ((flat != 0) & ~pruned), 1, 0).astype(flat.dtype)
  pruned, added = slots.unflatten(pruned), slots.unflatten(added)

  leaves = _tree.leaves_by_key(params)
  new_leaves = {}
  added_leaf = slots.slot_masks_for_leaves(added)
  keys = jax.random.split(rng, len(slots.layers))
  for key, layer in zip(keys, slots.layers):
    down_key = slots.key(layer, "lora", adapter.down_name)
    up_key = slots.key(layer, "lora", adapter.up_name)
    down, up = leaves[down_key], leaves[up_key]
    stack = layer.mask_shape[:-1]
    in_shape = down.shape[len(stack):-1]
    init = lambda k: adapter.init_down(k, in_shape)
    layer_keys = jax.random.split(key, math.prod(stack)) if stack else key
    if stack:
      fresh = jax.vmap(init)(layer_keys).reshape(down.shape)
    else:
      fresh = init(layer_keys)
    new_leaves[down_key] = jnp.where(added_leaf[down_key], fresh.astype(down.dtype), down)
    new_leaves[up_key] = jnp.where(added_leaf[up_key], jnp.zeros_like(up), up)
  new_mask = slots.unflatten(new_flat)
  for layer in slots.layers:
    new_leaves[slots.key(layer, "gates", _alora.MASK)] = new_mask[layer.path]
  return _tree.replace_leaves(params, new_leaves), Reallocation(pruned, added)


def alora_reset_optimizer_state(model_or_adapter, opt_state, fresh_state, params, slot_mask):
  """Resets the inner optimizer's state of the slots in ``slot_mask`` to ``fresh_state``'s.

  A state leaf belongs to a parameter when its tree path *ends with* that parameter's path
  (``mu['lora']['dense']['A']``) and its shape equals the parameter's, which holds for optax's
  per-parameter states (Adam moments, momentum traces, ``optax.partition``'s masked states).
  Leaves that match no adapter parameter (counts, schedules) are kept.

  Args:
    model_or_adapter: the wrapped model or its :class:`ALoRA` spec.
    opt_state: the inner optimizer's state.
    fresh_state: ``inner.init(params)`` (same structure).
    params: the parameters the state belongs to.
    slot_mask: per layer path, bool per slot (e.g. ``Reallocation.added``).
  """
  adapter = _alora.alora_spec(model_or_adapter)
  slots = _alora.Slots.of(adapter, params)
  per_leaf = slots.slot_masks_for_leaves(slot_mask)
  shapes = {k: v.shape for k, v in _tree.leaves_by_key(params).items() if k in per_leaf}
  lengths = sorted({len(k) for k in per_leaf}, reverse=True)

  def reset(keypath, old, fresh):
    names = _tree.keypath_names(keypath)
    for length in lengths:
      suffix = names[-length:]
      if suffix in per_leaf and tuple(jnp.shape(old)) == tuple(shapes[suffix]):
        return jnp.where(per_leaf[suffix], fresh, old)
    return old

  return jax.tree_util.tree_map_with_path(reset, opt_state, fresh_state)
