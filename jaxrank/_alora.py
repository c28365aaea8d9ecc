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
receivers, in the same even order). Where the receivers have no room, the paper lets the total
live rank shrink (Table 1: 20.0M → 19.6M); by default (``keep_budget=True``, jaxrank's) the rest
goes to the modules that lost ranks this round, so every round ends at exactly the budget
``num_modules × initial_rank``.

Choices where the paper is silent (reference/methods.md §3):

* scale ``alpha / initial_rank``, fixed for the whole run (it does not follow live ranks);
* new slots: ``A`` from :meth:`ALoRA.init_down` (LoRA's uniform ±1/sqrt(fan_in)), ``B = 0``;
* "modules that lost none" means: live rank > 0, no rank pruned this round, a free slot;
* ranks are counted per module, and a module is one matrix in one block (the stacked copies
  of an ``nn.scan`` layer are separate modules);
* ``n_A`` defaults to the number of modules (one rank per module per round);
* the gate is ``1[mask ≠ 0]`` and rounds write exact 0/1, so an inner optimizer's weight decay
  on the mask leaf changes neither the function nor the rank pattern
  (:func:`jaxrank.alora_freeze_masks` keeps the leaf itself bit-exact);
* the inner optimizer's *step count* is global, so a re-initialised slot continues with the
  inner optimizer's bias corrections of the current step (Adam moments start at zero).

Everything here is a pure function of arrays and runs under ``jit``. Two ways to use it:

* :func:`alora` wraps an inner optimizer; its ``update`` runs the whole schedule (``lax.cond``
  on the step count), so a training step stays one jitted function;
* :func:`ablation_scores`, :func:`prune_and_reallocate` and :func:`alora_reset_optimizer_state`
  (or :func:`alora_round`, all three) between epochs.

The method reads top to bottom over four files: this one (the spec and a flat view of its rank
slots), ``_alora_scoring.py`` (eq. 6), ``_alora_reallocation.py`` (steps 2–3 and the optimizer
reset) and ``_alora_schedule.py`` (the transform and one round).

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
  >>> # one round; the only matrix lost its worst rank and, with no other receiver, gets a
  >>> # fresh one back: the budget (2) is kept (keep_budget=False: the paper's 2 -> 1)
  >>> int(state.rounds_done), int(jnp.sum(trainable["gates"]["mask"]))
  (1, 2)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxrank import _adapter
from jaxrank import _tree

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
  reallocated ranks. The gate is ``stop_gradient(1[mask ≠ 0])``: the optimizer never trains
  it; only :func:`prune_and_reallocate` (or the :func:`alora` transform) writes it.

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
    """``1[mask ≠ 0]`` without gradient (eq. 3 with the gate fixed to 0/1).

    The stored leaf gets a zero gradient, but an inner optimizer with decoupled weight decay
    (``optax.adamw``) still shrinks it geometrically (1 → 0.95 in 50 steps at lr 1e-2, decay
    0.1). Reading the gate as ``mask ≠ 0`` (jaxrank's) makes the function and the rank pattern
    independent of that drift: no gradient-based update moves a 0 away from 0 or a positive
    value to exactly 0.
    """
    del rng_for
    mask = gates[MASK]
    return jax.lax.stop_gradient((mask != 0).astype(mask.dtype))


# --------------------------------------------------------------------------------------------
# Where the slots are: a flat view of every mask in the network
# --------------------------------------------------------------------------------------------


def alora_spec(model_or_adapter) -> ALoRA:
  """The :class:`ALoRA` spec of a wrapped model (``TypeError`` for another adapter)."""
  adapter = _tree.adapter_spec(model_or_adapter)
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
class Slots:
  """Every rank slot of the network, flattened in path order (module-major, slot-minor)."""

  layers: tuple
  capacity: int

  @classmethod
  def of(cls, adapter: ALoRA, params) -> "Slots":
    layers, offset = [], 0
    for path, layer in _tree.adapter_layers(adapter, params).items():
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
    return _tree.leaf_key(collection, layer.path, name)

  def flatten(self, per_layer: Mapping[str, Array]) -> Array:
    return jnp.concatenate([jnp.ravel(per_layer[l.path]) for l in self.layers])

  def unflatten(self, flat: Array) -> dict[str, Array]:
    out = {}
    for l in self.layers:
      n = math.prod(l.mask_shape)
      out[l.path] = flat[l.offset:l.offset + n].reshape(l.mask_shape)
    return out

  def masks(self, params) -> dict[str, Array]:
    leaves = _tree.leaves_by_key(params)
    return {l.path: leaves[self.key(l, "gates", MASK)] for l in self.layers}

  def with_gates(self, params, flat_mask: Array):
    per_layer = self.unflatten(flat_mask)
    return _tree.replace_leaves(
        params, {self.key(l, "gates", MASK): per_layer[l.path] for l in self.layers})

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


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)
