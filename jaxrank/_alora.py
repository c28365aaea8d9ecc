"""ALoRA (Liu et al., NAACL 2024): ablation-based rank importance, prune and reallocate.

ALoRA starts every adapted matrix ("module") at ``initial_rank`` live ranks, trains for ``K1``
steps, then repeats ``N_A`` rounds of

1. AB-LoRA scores (eq. 6) for every live rank ``r`` of the whole network on one fixed
   validation batch::

     IS(r) = S(M) - S(M∖r) + S(M_r),      S = -loss                                  (eq. 6)

   ``M`` is the network with its current gates, ``M∖r`` the same with rank ``r`` switched off,
   ``M_r`` the network with *only* rank ``r`` switched on (every other rank of every module
   off);
2. prune the ``n_A`` live ranks with the lowest scores (gate → 0);
3. give the freed ranks to the modules that lost none this round, as evenly as possible, the
   remainder to the modules of highest mean importance (paper footnotes 2–3: 8 ranks over
   m1 > m2 > m3 → 3, 3, 2);
4. recover for ``K2`` steps.

Static shapes. Every module holds ``rank`` (the *capacity*) slots; the ``gates`` collection
holds a fixed 0/1 ``mask`` per slot, ``initial_rank`` of them 1 at init. A new rank takes a
free slot (gate 0) of its module: ``A`` re-initialised, ``B = 0``, gate ``1`` and the inner
optimizer's state of that slot reset, so the network's function is unchanged at that moment.
A module without a free slot cannot receive ranks; it is skipped (its share goes to the other
receivers, in the same even order) and, where no receiver has room, the total live rank
shrinks, as it does in the paper when every module lost a rank (Table 1: 20.0M → 19.6M).

Choices where the paper is silent (reference/methods.md §3):

* scale ``alpha / initial_rank``, fixed for the whole run (it does not follow live ranks);
* new slots: ``A`` from :meth:`ALoRA.init_down` (LoRA's uniform ±1/sqrt(fan_in)), ``B = 0``;
* "modules that lost none" means: live rank > 0, no rank pruned this round, a free slot;
* ranks are counted per module, and a module is one matrix in one block (the stacked copies
  of an ``nn.scan`` layer are separate modules);
* ``n_A`` defaults to the number of modules (one rank per module per round);
* the inner optimizer's *step count* is global, so a re-initialised slot continues with the
  inner optimizer's bias corrections of the current step (Adam moments start at zero).

Everything here is a pure function of arrays and runs under ``jit``. Two ways to use it:

* :func:`alora` wraps an inner optimizer; its ``update`` runs the whole schedule (``lax.cond``
  on the step count), so a training step stays one jitted function;
* :func:`ablation_scores`, :func:`prune_and_reallocate` and :func:`alora_reset_optimizer_state`
  (or :func:`alora_round`, all three) between epochs.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> from jaxrank import ALoRA, alora
  >>> spec = ALoRA(rank=4, initial_rank=2, alpha=2.0)
  >>> model = jaxrank.wrap(nn.Dense(3), adapter=spec)
  >>> x, y = jnp.ones((8, 5)), jnp.zeros((8, 3))
  >>> variables = model.init(jax.random.key(0), x)
  >>> frozen = {"params": variables["params"]}
  >>> trainable = {"lora": variables["lora"], "gates": variables["gates"]}
  >>> def loss_fn(trainable, batch):
  ...   return jnp.mean((model.apply({**frozen, **trainable}, batch[0]) - batch[1]) ** 2)
  >>> tx = alora(optax.adam(1e-2), spec, loss_fn, warmup_steps=2, recovery_steps=2,
  ...                  num_rounds=1, total_steps=6, validation_batch=(x, y))
  >>> state = tx.init(trainable)
  >>> @jax.jit
  ... def step(trainable, state):
  ...   grads = jax.grad(loss_fn)(trainable, (x, y))
  ...   updates, state = tx.update(grads, state, trainable)
  ...   return optax.apply_updates(trainable, updates), state
  >>> for _ in range(6):
  ...   trainable, state = step(trainable, state)
  >>> # one round; the only matrix lost its worst rank, so nobody receives it (2 -> 1)
  >>> int(state.rounds_done), int(jnp.sum(trainable["gates"]["mask"]))
  (1, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _adapter
from jaxrank import _variables

Array = jax.Array
# ``loss_fn(params, batch) -> scalar``: ``params`` has the structure passed to the scoring
# functions / the optimizer (trainable ``{'lora', 'gates'}`` or full variables).
LossFn = Callable[[Any, Any], Array]

MASK = "mask"


# --------------------------------------------------------------------------------------------
# The adapter spec
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ALoRA(_adapter.LoRA):
  """LoRA with a fixed 0/1 gate per rank slot (ALoRA eq. 3, gates not trained).

  ``rank`` is the *capacity* r_cap of every adapted matrix (the slots it owns); the first
  ``initial_rank`` slots start live (gate 1), the others free (gate 0) and ready to receive
  reallocated ranks. The gate is ``stop_gradient(mask)``: the optimizer never changes it; only
  :func:`prune_and_reallocate` (or the :func:`alora` transform) writes it.

  Attributes:
    rank: slots per adapted matrix (capacity, r_cap); must exceed ``initial_rank`` so ranks
      can be added.
    initial_rank: live ranks per matrix at init (the paper's r_init; 8 in its experiments).
    alpha: the adapter output is multiplied by ``alpha / initial_rank``, a constant for the
      whole run (the paper does not say; this is LoRA's scale at the initial rank).

  Example:
    >>> from jaxrank import ALoRA
    >>> spec = ALoRA(rank=6, initial_rank=4, alpha=8.0)
    >>> spec.scale, spec.init_gates(None)["mask"].tolist()
    (2.0, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
  """

  rank: int = 16
  initial_rank: int = 8
  alpha: float = 16.0

  gate_names: ClassVar[tuple[str, ...]] = (MASK,)

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.initial_rank, int) or self.initial_rank < 1:
      raise ValueError(f"initial_rank must be a positive int, got {self.initial_rank!r}.")
    if self.rank <= self.initial_rank:
      raise ValueError(
          f"ALoRA needs capacity rank > initial_rank to receive reallocated ranks, got "
          f"rank={self.rank}, initial_rank={self.initial_rank}. Set rank to the most ranks one "
          f"matrix may hold, e.g. ALoRA(rank={2 * self.initial_rank}, "
          f"initial_rank={self.initial_rank})."
      )

  @property
  def scale(self) -> float:
    return self.alpha / self.initial_rank

  def init_gates(self, rng: Array) -> dict[str, Array]:
    del rng
    live = jnp.arange(self.rank) < self.initial_rank
    return {MASK: live.astype(self.param_dtype)}

  def gate(self, gates: Mapping[str, Array], rng_for) -> Array:
    del rng_for
    return jax.lax.stop_gradient(gates[MASK])


# --------------------------------------------------------------------------------------------
# Where the slots are: a flat view of every mask in the network
# --------------------------------------------------------------------------------------------


def _names(keypath) -> tuple:
  out = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    else:  # pragma: no cover
      out.append(str(k))
  return tuple(out)


def _spec(model_or_adapter) -> ALoRA:
  adapter = _variables._spec(model_or_adapter)
  if not isinstance(adapter, ALoRA):
    raise TypeError(
        f"jaxrank.alora needs a model wrapped with jaxrank.ALoRA (or that spec), got "
        f"{type(adapter).__name__}."
    )
  return adapter


class _Layer(NamedTuple):
  path: str
  # (stack..., capacity): the mask's shape
  mask_shape: tuple
  in_rank: int  # number of in axes of A
  out_rank: int  # number of out axes of B
  offset: int  # first flat slot


@dataclasses.dataclass(frozen=True)
class _Slots:
  """Every rank slot of the network, flattened in path order (module-major, slot-minor)."""

  layers: tuple
  capacity: int

  @classmethod
  def of(cls, adapter: ALoRA, params) -> "_Slots":
    layers, offset = [], 0
    for path, layer in _variables.adapter_layers(adapter, params).items():
      shape = tuple(layer.gates[MASK].shape)
      layers.append(_Layer(path, shape, len(layer.in_shape), len(layer.out_shape), offset))
      offset += math.prod(shape)
    return cls(tuple(layers), adapter.rank)

  @property
  def size(self) -> int:
    return sum(math.prod(l.mask_shape) for l in self.layers)

  @property
  def num_modules(self) -> int:
    return self.size // self.capacity

  def key(self, layer: _Layer, collection: str, name: str) -> tuple:
    parts = tuple(layer.path.split("/")) if layer.path else ()
    return (collection, *parts, name)

  def flatten(self, per_layer: Mapping[str, Array]) -> Array:
    return jnp.concatenate([jnp.ravel(per_layer[l.path]) for l in self.layers])

  def unflatten(self, flat: Array) -> dict[str, Array]:
    out = {}
    for l in self.layers:
      n = math.prod(l.mask_shape)
      out[l.path] = flat[l.offset:l.offset + n].reshape(l.mask_shape)
    return out

  def masks(self, params) -> dict[str, Array]:
    leaves = self.leaves(params)
    return {l.path: leaves[self.key(l, "gates", MASK)] for l in self.layers}

  def leaves(self, params) -> dict[tuple, Array]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_names(k): v for k, v in flat}

  def replace(self, params, new_leaves: Mapping[tuple, Array]):
    """``params`` with the leaves named in ``new_leaves`` replaced (structure kept)."""

    def pick(keypath, leaf):
      new = new_leaves.get(_names(keypath))
      return leaf if new is None else new.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, params)

  def with_gates(self, params, flat_mask: Array):
    per_layer = self.unflatten(flat_mask)
    return self.replace(params, {self.key(l, "gates", MASK): per_layer[l.path] for l in self.layers})

  def slot_masks_for_leaves(self, slot_mask: Mapping[str, Array]) -> dict[tuple, Array]:
    """Per ``lora``/``gates`` leaf, ``slot_mask`` broadcastable to the leaf's shape."""
    out = {}
    for l in self.layers:
      m = slot_mask[l.path]
      stack = l.mask_shape[:-1]
      out[self.key(l, "lora", ALoRA.down_name)] = m.reshape(
          stack + (1,) * l.in_rank + (self.capacity,))
      out[self.key(l, "lora", ALoRA.up_name)] = m.reshape(
          stack + (self.capacity,) + (1,) * l.out_rank)
      out[self.key(l, "gates", MASK)] = m
    return out


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


# --------------------------------------------------------------------------------------------
# AB-LoRA scores (eq. 6)
# --------------------------------------------------------------------------------------------


def _scores_flat(loss_fn, slots: _Slots, params, batch, chunk_size: int, max_live: int):
  flat = slots.flatten(slots.masks(params))
  n = flat.size
  live = flat != 0
  num_chunks = max(1, -(-max_live // chunk_size))
  padded = num_chunks * chunk_size
  # Indices of live slots (static length); the padding points past the end and is dropped.
  index = jnp.nonzero(live, size=padded, fill_value=n)[0]

  def loss_of(mask):
    return loss_fn(slots.with_gates(params, mask), batch)

  def pair(i):
    ablated = flat.at[i].set(0, mode="drop")  # M∖r
    gate_i = flat.at[i].get(mode="fill", fill_value=0)
    alone = jnp.zeros_like(flat).at[i].set(gate_i, mode="drop")  # M_r
    return jax.vmap(loss_of)(jnp.stack([ablated, alone]))

  losses = jax.lax.map(jax.vmap(pair), index.reshape(num_chunks, chunk_size))
  losses = losses.reshape(padded, 2)
  full = loss_of(flat)
  # IS(r) = S(M) - S(M∖r) + S(M_r) with S = -loss                                     (eq. 6)
  importance = -full + losses[:, 0] - losses[:, 1]
  scores = jnp.full((n,), jnp.nan, importance.dtype)
  return scores.at[index].set(importance, mode="drop"), full


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _scores_flat_jit(loss_fn, slots, params, batch, chunk_size, max_live):
  return _scores_flat(loss_fn, slots, params, batch, chunk_size, max_live)


def _max_live(adapter: ALoRA, slots: _Slots, params, max_live: Optional[int]) -> int:
  if max_live is not None:
    return int(max_live)
  flat = slots.flatten(slots.masks(params))
  if _is_concrete(flat):
    return max(1, int(np.count_nonzero(np.asarray(flat))))
  # Traced: rounds never raise the live total above its initial value.
  return slots.num_modules * adapter.initial_rank


def ablation_scores(
    loss_fn: LossFn,
    model_or_adapter,
    params,
    batch,
    *,
    chunk_size: int = 32,
    max_live: Optional[int] = None,
) -> dict[str, Array]:
  """AB-LoRA importance (eq. 6) of every live rank, batched over gate masks.

  For each live slot ``r`` the two masks ``M∖r`` and ``M_r`` are built and their losses are
  evaluated ``2 * chunk_size`` masks per vmapped call, ``lax.map`` over chunks, so memory is
  bounded by one chunk's activations; one compiled program scores the whole network.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. cross-entropy on ``batch``. It receives
      ``params`` with the ``gates`` leaves replaced; ``S = -loss``.
    model_or_adapter: the model from ``jaxrank.wrap(..., adapter=ALoRA(...))`` or the spec.
    params: a dict holding ``lora`` and ``gates`` (trainable or full variables).
    batch: the fixed validation batch ``B_val``.
    chunk_size: slots scored per vmapped call (each slot costs two forward passes).
    max_live: the most live slots to score (static). By default, the live count of concrete
      ``params``, or ``num_modules * initial_rank`` under ``jit``.

  Returns:
    Per layer path, scores shaped like its mask; ``nan`` on dead slots.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
    >>> from jaxrank import ALoRA, ablation_scores
    >>> model = jaxrank.wrap(nn.Dense(2), adapter=ALoRA(rank=3, initial_rank=2))
    >>> v = model.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> loss = lambda v, x: jnp.mean(model.apply(v, x) ** 2)
    >>> scores = ablation_scores(loss, model, v, jnp.ones((4, 3)))
    >>> bool(jnp.isnan(scores[""][2])), scores[""].shape
    (True, (3,))
  """
  adapter = _spec(model_or_adapter)
  slots = _Slots.of(adapter, params)
  limit = _max_live(adapter, slots, params, max_live)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  chunk_size = min(int(chunk_size), limit)
  leaves = jax.tree.leaves((params, batch))
  run = _scores_flat_jit if all(map(_is_concrete, leaves)) else _scores_flat
  scores, _ = run(loss_fn, slots, params, batch, chunk_size, limit)
  return slots.unflatten(scores)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_with_gates_jit(loss_fn, slots, params, batch, flat_mask):
  return loss_fn(slots.with_gates(params, flat_mask), batch)


def ablation_scores_naive(loss_fn: LossFn, model_or_adapter, params, batch) -> dict[str, Array]:
  """The same scores as :func:`ablation_scores` by a Python loop of ``2R + 1`` forward passes.

  For tests and benchmarks; needs concrete ``params``.
  """
  adapter = _spec(model_or_adapter)
  slots = _Slots.of(adapter, params)
  flat = np.asarray(slots.flatten(slots.masks(params)))
  loss_of = functools.partial(_loss_with_gates_jit, loss_fn, slots)
  full = float(loss_of(params, batch, jnp.asarray(flat)))
  scores = np.full(flat.shape, np.nan, np.float32)
  for r in np.flatnonzero(flat):
    ablated = flat.copy()
    ablated[r] = 0
    alone = np.zeros_like(flat)
    alone[r] = flat[r]
    # IS(r) = S(M) - S(M∖r) + S(M_r), S = -loss                                          (eq. 6)
    scores[r] = (-full + float(loss_of(params, batch, jnp.asarray(ablated)))
                 - float(loss_of(params, batch, jnp.asarray(alone))))
  return slots.unflatten(jnp.asarray(scores))


# --------------------------------------------------------------------------------------------
# Prune and reallocate
# --------------------------------------------------------------------------------------------


class Reallocation(NamedTuple):
  """What one round did, per layer path, as bool masks shaped like the layer's gate mask."""

  pruned: dict
  added: dict


def _inverse_permutation(order: Array) -> Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))


def reallocation_plan(flat_mask: Array, flat_scores: Array, num_prune, capacity: int):
  """The pruned and added slots of one round, on flat (module-major) arrays.

  Args:
    flat_mask: 0/1 gates of every slot, ``num_modules * capacity`` long.
    flat_scores: importance per slot (``nan`` where not scored).
    num_prune: ``n_A`` (may be traced); at most the scored live slots are pruned.
    capacity: slots per module.

  Returns:
    ``(pruned, added)``: bool arrays shaped like ``flat_mask``.

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
  # Footnote 3: as evenly as possible, the remainder to the highest mean importance. Ticket
  # (module j, level l) means "j's (l+1)-th new rank"; taking tickets by (level, priority)
  # hands out ranks round-robin in priority order, skipping modules whose slots run out.
  priority = _inverse_permutation(
      jnp.argsort(jnp.where(receiver, -mean_importance, jnp.inf), stable=True))
  level = jnp.arange(capacity)[None, :]
  ticket_ok = receiver[:, None] & (level < free_per_module[:, None])
  ticket_key = jnp.where(ticket_ok, level * modules + priority[:, None], modules * capacity)
  ticket_position = _inverse_permutation(jnp.argsort(ticket_key.reshape(-1), stable=True))
  taken = ticket_ok.reshape(-1) & (ticket_position < jnp.sum(pruned))
  added_per_module = jnp.sum(grid(taken), axis=1)
  free = grid(~live)
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

  Returns:
    ``(new_params, Reallocation(pruned, added))`` (``params``' structure kept).
  """
  adapter = _spec(model_or_adapter)
  slots = _Slots.of(adapter, params)
  num_prune = slots.num_modules if num_prune is None else num_prune
  flat = slots.flatten(slots.masks(params))
  if _is_concrete(flat) and isinstance(num_prune, int):
    live = int(np.count_nonzero(np.asarray(flat)))
    if num_prune > live:
      raise ValueError(
          f"num_prune (n_A) = {num_prune} is larger than the {live} live ranks; lower n_A or "
          "the number of rounds."
      )
  if isinstance(num_prune, int) and num_prune < 0:
    raise ValueError(f"num_prune must be >= 0, got {num_prune}.")
  pruned, added = reallocation_plan(flat, slots.flatten(scores), num_prune, slots.capacity)
  new_flat = jnp.where(pruned, 0, jnp.where(added, 1, flat)).astype(flat.dtype)
  pruned, added = slots.unflatten(pruned), slots.unflatten(added)

  leaves = slots.leaves(params)
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
    new_leaves[slots.key(layer, "gates", MASK)] = new_mask[layer.path]
  return slots.replace(params, new_leaves), Reallocation(pruned, added)


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
  adapter = _spec(model_or_adapter)
  slots = _Slots.of(adapter, params)
  per_leaf = slots.slot_masks_for_leaves(slot_mask)
  shapes = {k: v.shape for k, v in slots.leaves(params).items() if k in per_leaf}
  lengths = sorted({len(k) for k in per_leaf}, reverse=True)

  def reset(keypath, old, fresh):
    names = _names(keypath)
    for length in lengths:
      suffix = names[-length:]
      if suffix in per_leaf and tuple(jnp.shape(old)) == tuple(shapes[suffix]):
        return jnp.where(per_leaf[suffix], fresh, old)
    return old

  return jax.tree_util.tree_map_with_path(reset, opt_state, fresh_state)


def alora_round(
    loss_fn: LossFn,
    model_or_adapter,
    params,
    batch,
    *,
    rng: Array,
    num_prune: Optional[int] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    opt_state=None,
    chunk_size: int = 32,
):
  """Scores, prunes, reallocates and (given ``optimizer, opt_state``) resets new slots' state.

  For loops that run the ALoRA rounds between epochs.

  Returns:
    ``(params, opt_state, scores, Reallocation)``.
  """
  scores = ablation_scores(loss_fn, model_or_adapter, params, batch, chunk_size=chunk_size)
  new_params, info = prune_and_reallocate(
      model_or_adapter, params, scores, num_prune=num_prune, rng=rng)
  if optimizer is not None and opt_state is not None:
    opt_state = alora_reset_optimizer_state(
        model_or_adapter, opt_state, optimizer.init(new_params), new_params, info.added)
  return new_params, opt_state, scores, info


# --------------------------------------------------------------------------------------------
# The schedule as an optax transformation
# --------------------------------------------------------------------------------------------


class ALoRAState(NamedTuple):
  """State of :func:`alora`."""

  count: Array  # optimizer steps done
  rounds_done: Array
  rng: Array
  last_scores: Any  # per layer path, the scores of the latest round (nan before/dead)
  inner_state: Any


def alora_check_schedule(warmup_steps: int, recovery_steps: int, num_rounds: int,
                   total_steps: Optional[int] = None) -> None:
  """Raises ``ValueError`` if K1, K2, N_A cannot run within ``total_steps``."""
  for name, value, low in (("warmup_steps (K1)", warmup_steps, 1),
                           ("recovery_steps (K2)", recovery_steps, 1),
                           ("num_rounds (N_A)", num_rounds, 0)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
  if total_steps is not None:
    needed = warmup_steps + num_rounds * recovery_steps
    if needed > total_steps:
      raise ValueError(
          f"K1 + N_A * K2 = {warmup_steps} + {num_rounds} * {recovery_steps} = {needed} "
          f"optimizer steps exceed total_steps={total_steps}: the last round would get no "
          "recovery. Lower num_rounds, warmup_steps or recovery_steps, or train longer."
      )


def alora(
    inner: optax.GradientTransformation,
    model_or_adapter,
    loss_fn: LossFn,
    *,
    warmup_steps: int,
    recovery_steps: int,
    num_rounds: int,
    ranks_per_round: Optional[int] = None,
    total_steps: Optional[int] = None,
    validation_batch: Any = None,
    chunk_size: int = 32,
    seed: int = 0,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """ALoRA's schedule (Algorithm 1) around an inner optimizer, in optimizer steps.

  After step ``K1 + k·K2`` (``k = 0 .. N_A-1``) the update also runs one round: AB-LoRA scores
  on ``validation_batch`` (eq. 6), prune ``n_A`` ranks, reallocate, reset the inner state of
  the new slots. The round is inside ``lax.cond``, so one jitted step does everything. Gate
  leaves get zero updates from the inner optimizer (no weight decay on them); only rounds
  write them. Wrap with ``optax.MultiSteps`` *outside* this transform to accumulate gradients
  (steps then count optimizer steps and the ranks equal the big batch's). K1, K2, N_A, n_A are
  static ints (they fix the program); the inner optimizer's hyperparameters may be injected
  with ``optax.inject_hyperparams`` as usual. Under ``vmap`` of the whole step ``lax.cond``
  becomes a select and the scoring would run every step; ``jit`` (and sharding) keep the cond.

  Args:
    inner: the optimizer of the ``lora`` factors (e.g. ``optax.adamw(1e-4)``).
    model_or_adapter: the wrapped model or its :class:`ALoRA` spec.
    loss_fn: ``loss_fn(params, batch) -> scalar`` with ``params`` structured like the params
      given to ``update`` (close over the frozen base params).
    warmup_steps: K1, steps of super-network training before the first round.
    recovery_steps: K2 > 0, steps between rounds (and after the last).
    num_rounds: N_A.
    ranks_per_round: n_A; default one per adapted matrix (the paper's 1 × N_mod).
    total_steps: when given, checks ``K1 + N_A·K2 <= total_steps``.
    validation_batch: B_val; may instead be passed to ``update(..., validation_batch=...)``.
      Any pytree: it can also carry the frozen base params, so that ``loss_fn`` need not
      close over them (closed-over arrays become constants of the compiled step).
    chunk_size: slots per vmapped scoring call (memory vs speed; a call runs
      ``2 * chunk_size`` forwards of the validation batch at once). On CPU 1 is fastest and
      lightest (benchmarks/alora_round.py); batching pays on accelerators.
    seed: seeds the re-initialisation of new ``A`` columns.
    axis_name: under ``pmap``/``shard_map``, the mapped axis over which the scores are
      averaged (``lax.pmean``) before ranking, so every device prunes and adds the same ranks
      even when each holds a different validation shard.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update(updates, state, params, *,
    validation_batch=None, **extra_args)`` needs ``params``.
  """
  adapter = _spec(model_or_adapter)
  alora_check_schedule(warmup_steps, recovery_steps, num_rounds, total_steps)
  if ranks_per_round is not None and (not isinstance(ranks_per_round, int) or ranks_per_round < 1):
    raise ValueError(f"ranks_per_round (n_A) must be a positive int, got {ranks_per_round!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  inner = optax.with_extra_args_support(inner)
  default_batch = validation_batch

  def resolve(slots: _Slots) -> int:
    return slots.num_modules if ranks_per_round is None else ranks_per_round

  def init_fn(params):
    slots = _Slots.of(adapter, params)
    n_a = resolve(slots)
    flat = slots.flatten(slots.masks(params))
    bound = slots.num_modules * adapter.initial_rank
    if _is_concrete(flat):
      live = int(np.count_nonzero(np.asarray(flat)))
      if live > bound:
        raise ValueError(
            f"{live} live ranks exceed num_modules * initial_rank = {bound}; the jitted "
            "scorer scores at most that many. Start from the gates ALoRA.init_gates makes."
        )
    if n_a > bound:
      raise ValueError(
          f"ranks_per_round (n_A) = {n_a} is larger than the {bound} live ranks "
          f"({slots.num_modules} matrices x initial_rank {adapter.initial_rank}); lower n_A."
      )
    scores = slots.unflatten(jnp.full((slots.size,), jnp.nan, jnp.float32))
    return ALoRAState(
        count=jnp.zeros([], jnp.int32),
        rounds_done=jnp.zeros([], jnp.int32),
        rng=jax.random.key(seed),
        last_scores=scores,
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, *, validation_batch=None, **extra_args):
    if params is None:
      raise ValueError("jaxrank.alora needs params: call tx.update(grads, state, params).")
    batch = default_batch if validation_batch is None else validation_batch
    if batch is None:
      raise ValueError(
          "jaxrank.alora needs a validation batch: pass alora(..., validation_batch=B_val) or "
          "tx.update(grads, state, params, validation_batch=B_val)."
      )
    slots = _Slots.of(adapter, params)
    n_a = resolve(slots)
    limit = slots.num_modules * adapter.initial_rank
    chunk = min(chunk_size, limit)
    gate_keys = {slots.key(l, "gates", MASK) for l in slots.layers}

    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    inner_updates = jax.tree_util.tree_map_with_path(
        lambda k, u: jnp.zeros_like(u) if _names(k) in gate_keys else u, inner_updates)
    count = state.count + 1
    since = count - warmup_steps
    is_round = ((since >= 0) & (since % recovery_steps == 0)
                & (since // recovery_steps < num_rounds))

    def do_round(operand):
      inner_updates, inner_state, rng = operand
      rng, key = jax.random.split(rng)
      stepped = optax.apply_updates(params, inner_updates)
      flat_scores, _ = _scores_flat(loss_fn, slots, stepped, batch, chunk, limit)
      if axis_name is not None:
        flat_scores = jax.lax.pmean(flat_scores, axis_name)
      scores = slots.unflatten(flat_scores)
      rounded, info = prune_and_reallocate(adapter, stepped, scores, num_prune=n_a, rng=key)
      inner_state = alora_reset_optimizer_state(
          adapter, inner_state, inner.init(rounded), rounded, info.added)
      added = slots.slot_masks_for_leaves(info.added)

      def new_update(keypath, update, old, new):
        name = _names(keypath)
        if name in gate_keys:  # 0/1 gates: old + (new - old) == new exactly
          return (new - old).astype(update.dtype)
        if name in added:  # new slots: A re-initialised, B = 0 (exactly: old + -old)
          return jnp.where(added[name], (new - old).astype(update.dtype), update)
        return update

      new_updates = jax.tree_util.tree_map_with_path(new_update, inner_updates, params, rounded)
      return new_updates, inner_state, rng, jax.tree.map(
          lambda s: s.astype(jnp.float32), scores)

    def no_round(operand):
      inner_updates, inner_state, rng = operand
      return inner_updates, inner_state, rng, state.last_scores

    new_updates, inner_state, rng, scores = jax.lax.cond(
        is_round, do_round, no_round, (inner_updates, inner_state, state.rng))
    return new_updates, ALoRAState(
        count=count,
        rounds_done=state.rounds_done + is_round.astype(jnp.int32),
        rng=rng,
        last_scores=scores,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def live_rank_total(model_or_adapter, params) -> int:
  """The number of live ranks in the whole network."""
  return int(sum(np.sum(np.asarray(m)) for m in _variables.rank_masks(
      _spec(model_or_adapter), params).values()))
