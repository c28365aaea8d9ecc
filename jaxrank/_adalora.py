"""AdaLoRA (Zhang et al., 2023): SVD-form adapters and a sensitivity-based global rank budget.

Two pieces:

* :class:`AdaLoRA`, the adapter spec. ``Δ = P Λ Q`` (eq. 3). In jaxrank's layout ``down`` is
  ``Q^T`` with shape ``(*in_shape, r)`` (``lora/.../Q``, PEFT ``lora_A`` transposed), ``up`` is
  ``P^T`` with shape ``(r, *out_shape)`` (``lora/.../P``, PEFT ``lora_B`` transposed) and the
  singular values ``Λ`` are the gate ``gates/.../singular_values`` (PEFT ``lora_E``).
* :func:`adalora`, an optax transformation that wraps the inner optimizer (like
  ``optax.contrib.sam``). After the inner update it scores every triplet with the smoothed
  sensitivity × uncertainty (eq. 7–11), shrinks the number of kept singular values along PEFT's
  cubic budget and zeroes the ``Λ`` entries outside the global top-``b(t)`` (eq. 6).

The orthogonality penalty (eq. 4) is :func:`jaxrank.orthogonality_penalty`; add it to the loss
(``form="paper"``: squared and summed, the default; ``form="peft"``: PEFT's unsquared mean, use
it with weight ``orth_reg_weight=0.5`` to reproduce PEFT).

Step convention (PEFT's): the ``t``-th call of ``update`` (``t = 0, 1, ...``, the count of
optimizer steps already taken) plays the role of PEFT's ``update_and_allocate(global_step=t)``,
called after ``optimizer.step()``. Within one call, in PEFT's order:

1. the inner optimizer's update ``u`` and the post-update parameters ``w' = w + u``;
2. while ``t < total_step - tfinal``: ``I = |w' · g|`` with ``g`` the gradient passed in (eq. 8),
   ``Ī ← β1 Ī + (1 − β1) I`` (eq. 9), ``Ū ← β2 Ū + (1 − β2) |I − Ī|`` with the *new* ``Ī``
   (eq. 10);
3. the triplet score ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with ``s = Ī · Ū``
   (eq. 7, 11);
4. the budget ``b(t)`` (:func:`adalora_budget_schedule`, in ``_adalora_budget.py``); a mask event when ``tinit < t < total_step −
   tfinal`` and ``t % deltaT == 0``, or ``t == total_step − tfinal`` (the final allocation,
   budget ``target_r · n``, after which the EMAs are reset as PEFT does); at a mask event the
   ``Λ`` entries whose score is not above the ``(n_total − b)``-th smallest are set to zero
   (eq. 6, PEFT's ``kthvalue``/``<=`` rule, see :func:`jaxrank.budget_threshold`);
5. for ``t > total_step − tfinal`` the frozen final mask is reapplied every step.

Masked triplets keep their ``P``/``Q`` and optimizer state and keep receiving gradient, so they
can regrow between mask events (the paper's design). The budget is a traced value read from a
table, so it never triggers recompilation.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> from jaxrank import AdaLoRA, adalora, adalora_rank_pattern
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(4, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))
  >>> model = jaxrank.wrap(MLP(), adapter=AdaLoRA(rank=4, alpha=8.0))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> frozen, trainable = jaxrank.split_variables(variables)
  >>> tx = adalora(optax.adam(1e-2), init_r=4, target_r=2, tinit=2, tfinal=2, total_step=10)
  >>> state = tx.init(trainable)
  >>> x = jax.random.normal(jax.random.key(1), (5, 3))
  >>> loss = lambda t: jnp.mean((model.apply({**frozen, **t}, x) - 1.0) ** 2)
  >>> update = jax.jit(tx.update)  # the budget is traced: one compilation for the whole run
  >>> for _ in range(10):
  ...   grads = jax.grad(loss)(trainable)
  ...   updates, state = update(grads, state, trainable)
  ...   trainable = optax.apply_updates(trainable, updates)
  >>> pattern = adalora_rank_pattern(state)  # a bool per rank and layer
  >>> sorted(pattern), sum(int(kept.sum()) for kept in pattern.values())  # budget 2 x 2 layers
  (['hidden', 'out'], 4)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _adalora_budget
from jaxrank import _adapter
from jaxrank import _budget
from jaxrank import _tree

Array = jax.Array


# --------------------------------------------------------------------------------------------
# The adapter spec
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdaLoRA(_adapter.LoRA):
  """SVD-form adapter ``Δ = P Λ Q`` (AdaLoRA eq. 3), initialised as PEFT does.

  ``P`` and ``Q`` start Gaussian with standard deviation ``init_std`` (0.02, PEFT) and ``Λ``
  at zero, so the adapted model equals its base model at initialisation.

  Scale: PEFT's ``SVDLinear`` multiplies the branch by ``lora_alpha / (ranknum + 1e-5)`` with
  ``ranknum = init_r`` that is never decreased when triplets are masked (and is restored on
  load), and uses ``r`` in place of ``lora_alpha`` when ``lora_alpha <= 0``. :attr:`scale`
  reproduces that exactly: ``alpha / (rank + 1e-5)`` (``rank / (rank + 1e-5)`` for
  ``alpha <= 0``), fixed for the whole run.

  Attributes:
    rank: ``init_r``, the number of triplets per adapted layer (PEFT default 12).
    alpha: PEFT ``lora_alpha`` (default 8, PEFT's).
    init_std: standard deviation of the Gaussian init of ``P`` and ``Q``.

  Example:
    >>> from jaxrank import AdaLoRA
    >>> spec = AdaLoRA(rank=12, alpha=8.0)
    >>> round(spec.scale, 6), spec.down_name, spec.up_name, spec.gate_names
    (0.666666, 'Q', 'P', ('singular_values',))
  """

  rank: int = 12
  alpha: float = 8.0
  init_std: float = 0.02

  down_name = "Q"
  up_name = "P"
  gate_names: ClassVar[tuple[str, ...]] = ("singular_values",)

  @property
  def scale(self) -> float:
    numerator = self.alpha if self.alpha > 0 else float(self.rank)
    return numerator / (self.rank + 1e-5)

  def init_down(self, rng: Array, in_shape: tuple[int, ...]) -> Array:
    """``Q^T`` of shape ``(*in_shape, rank)``, Gaussian with std ``init_std``."""
    return self.init_std * jax.random.normal(rng, (*in_shape, self.rank), self.param_dtype)

  def init_up(self, rng: Array, out_shape: tuple[int, ...]) -> Array:
    """``P^T`` of shape ``(rank, *out_shape)``, Gaussian with std ``init_std``."""
    return self.init_std * jax.random.normal(rng, (self.rank, *out_shape), self.param_dtype)

  def init_gates(self, rng: Array) -> dict[str, Array]:
    """``Λ`` (the singular values), zeros of shape ``(rank,)``."""
    del rng
    return {"singular_values": jnp.zeros((self.rank,), self.param_dtype)}

  def gate(self, gates: Mapping[str, Array], rng_for) -> Array:
    del rng_for
    return gates["singular_values"]


# --------------------------------------------------------------------------------------------
# Finding the adapters in a parameter tree
# --------------------------------------------------------------------------------------------


class _Layer(NamedTuple):
  """Keys of one adapted layer's leaves in the parameter tree (static)."""

  down: tuple
  up: tuple
  gate: tuple
  stacked_axes: int


def _find_layers(leaves, down_name: str, up_name: str, gate_name: str) -> dict[str, _Layer]:
  layers = {
      path: _Layer(keys.down, keys.up, keys.gates[gate_name],
                   jnp.ndim(leaves[keys.gates[gate_name]]) - 1)
      for path, keys in _tree.find_layers(leaves, down_name, up_name, (gate_name,)).items()
      if gate_name in keys.gates
  }
  if not layers:
    raise ValueError(
        f"jaxrank.adalora found no AdaLoRA adapters (gates/.../{gate_name} with lora/.../"
        f"{down_name} and lora/.../{up_name}) in the parameters. Wrap the model with "
        "adapter=jaxrank.AdaLoRA(...) and pass the trainable variables "
        "{'lora': ..., 'gates': ...} (or all variables) as params to init and update.")
  return layers


# --------------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------------


class AdaLoraState(NamedTuple):
  """State of :func:`adalora`.

  Attributes:
    count: optimizer steps taken (the ``global_step`` of the next update).
    inner_state: the inner optimizer's state.
    sensitivity: per layer path, ``{'down','up','gate'}`` EMAs ``Ī`` (eq. 9).
    uncertainty: per layer path, ``{'down','up','gate'}`` EMAs ``Ū`` (eq. 10).
    rank_masks: per layer path, a bool per rank: the pattern of the last mask event
      (all True before the first), i.e. PEFT's ``rank_pattern``.
    budget: the budget ``b(t)`` of the last update.
  """

  count: Array
  inner_state: Any
  sensitivity: dict
  uncertainty: dict
  rank_masks: dict
  budget: Array


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def adalora(
    inner_optimizer: optax.GradientTransformation,
    *,
    init_r: int = 12,
    target_r: int = 8,
    tinit: int = 0,
    tfinal: int = 0,
    total_step: Optional[int] = None,
    deltaT: int = 1,
    beta1: jax.typing.ArrayLike = 0.85,
    beta2: jax.typing.ArrayLike = 0.85,
    axis_name: Optional[str] = None,
    down_name: str = AdaLoRA.down_name,
    up_name: str = AdaLoRA.up_name,
    gate_name: str = AdaLoRA.gate_names[0],
) -> optax.GradientTransformationExtraArgs:
  """AdaLoRA's importance-aware rank allocation around ``inner_optimizer`` (see module doc).

  Defaults are PEFT's ``AdaLoraConfig`` defaults.

  Args:
    inner_optimizer: the optimizer of all trainable leaves (e.g. ``optax.adamw(lr)``).
    init_r: the initial rank of every adapter (must equal ``AdaLoRA.rank``).
    target_r: the target *average* rank; the final budget is ``target_r × n_matrices``.
    tinit: warmup steps without masking (``t <= tinit``).
    tfinal: length of the final phase; the mask is frozen at ``t = total_step − tfinal``.
    total_step: the number of optimizer steps of the run (required).
    deltaT: mask every ``deltaT`` steps during the budgeting phase.
    beta1: EMA factor of the sensitivity (eq. 9), in (0, 1).
    beta2: EMA factor of the uncertainty (eq. 10), in (0, 1).
    axis_name: under ``pmap``/``shard_map``/``vmap``, the axis over which triplet scores are
      averaged (``lax.pmean``) before ranking, so every replica keeps the same triplets.
    down_name, up_name, gate_name: names of ``Q``, ``P`` in ``lora`` and ``Λ`` in ``gates``.

  The schedule arguments are static Python ints (with ``optax.inject_hyperparams``, name them
  in ``static_args``); ``beta1``/``beta2`` may be traced.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.
  """
  if total_step is None:
    raise ValueError(
        "total_step is required: pass the number of optimizer steps of the run (with "
        "optax.MultiSteps, count accumulated steps, not micro-batches).")
  _check_int("total_step", total_step, 1)
  _check_int("init_r", init_r, 1)
  _check_int("target_r", target_r, 0)
  _check_int("tinit", tinit, 0)
  _check_int("tfinal", tfinal, 0)
  _check_int("deltaT", deltaT, 1)
  if target_r > init_r:
    raise ValueError(
        f"target_r={target_r} > init_r={init_r}: the budget can only shrink. Lower target_r or "
        "raise init_r.")
  if tinit >= total_step - tfinal:
    raise ValueError(
        f"tinit={tinit} >= total_step - tfinal={total_step - tfinal} leaves no budgeting phase. "
        "Lower tinit or tfinal, or raise total_step.")
  for name, beta in (("beta1", beta1), ("beta2", beta2)):
    try:
      value = float(beta)
    except (TypeError, jax.errors.ConcretizationTypeError):  # traced (inject_hyperparams)
      continue
    if not 0.0 < value < 1.0:
      raise ValueError(f"{name} must be in (0, 1) (an EMA factor such as 0.85), got {beta!r}.")
  final_step = total_step - tfinal

  def layers_of(params):
    if params is None:
      raise ValueError(
          "jaxrank.adalora needs the parameters: call tx.init(params) and "
          "tx.update(grads, state, params).")
    leaves = _tree.leaves_by_key(params)
    layers = _find_layers(leaves, down_name, up_name, gate_name)
    for path, layer in layers.items():
      rank = jnp.shape(leaves[layer.gate])[-1]
      if rank != init_r:
        raise ValueError(
            f"gates/{path}/{gate_name} has {rank} singular values but init_r={init_r}: pass "
            "init_r equal to the AdaLoRA adapter's rank.")
    return layers, leaves

  def zeros_like_factors(layers, leaves):
    return {
        # zeros_like keeps each parameter's sharding (required on Explicit meshes)
        path: {part: jnp.zeros_like(leaves[getattr(layer, part)], jnp.float32)
               for part in ("down", "up", "gate")}
        for path, layer in layers.items()
    }

  def init_fn(params):
    layers, leaves = layers_of(params)
    zeros = zeros_like_factors(layers, leaves)
    masks = {path: jnp.ones(jnp.shape(leaves[layer.gate]), bool) for path, layer in layers.items()}
    init_budget = sum(int(np.prod(jnp.shape(leaves[l.gate]))) for l in layers.values())
    return AdaLoraState(
        count=jnp.zeros((), jnp.int32),
        inner_state=inner_optimizer.init(params),
        sensitivity=zeros,
        uncertainty=jax.tree.map(jnp.zeros_like, zeros),
        rank_masks=masks,
        budget=jnp.asarray(init_budget, jnp.int32),
    )

  def triplet_score(layer, sensitivity, uncertainty):
    """Eq. 7 with s = Ī·Ū (eq. 11): shape ``(*stack, r)``."""
    s = {part: sensitivity[part] * uncertainty[part] for part in ("down", "up", "gate")}
    lead = layer.stacked_axes
    down_axes = tuple(range(lead, s["down"].ndim - 1))  # over in_shape
    up_axes = tuple(range(lead + 1, s["up"].ndim))  # over out_shape
    return s["gate"] + jnp.mean(s["down"], axis=down_axes) + jnp.mean(s["up"], axis=up_axes)

  def update_fn(updates, state, params=None, **extra_args):
    layers, leaves = layers_of(params)
    inner_updates, inner_state = inner_optimizer.update(
        updates, state.inner_state, params, **extra_args)
    grad_leaves = _tree.leaves_by_key(updates)
    update_leaves = _tree.leaves_by_key(inner_updates)
    if set(grad_leaves) != set(leaves):
      raise ValueError("jaxrank.adalora: updates and params have different tree structures.")

    n_matrices = sum(int(np.prod(jnp.shape(leaves[l.gate])[:-1])) for l in layers.values())
    init_budget = n_matrices * init_r
    budget_table, event_table = _adalora_budget.schedule_tables(
        init_budget, target_r * n_matrices, tinit, tfinal, total_step, deltaT)
    step = state.count
    table_index = jnp.minimum(step, total_step)
    budget = jnp.asarray(budget_table)[table_index]
    mask_event = jnp.asarray(event_table)[table_index]
    collecting = step < final_step
    in_final_phase = step > final_step

    b1 = jnp.asarray(beta1, jnp.float32)
    b2 = jnp.asarray(beta2, jnp.float32)
    sensitivity, uncertainty, scores, new_values = {}, {}, {}, {}
    for path, layer in layers.items():
      sens, unc, new = {}, {}, {}
      for part in ("down", "up", "gate"):
        i = getattr(layer, part)
        new[part] = leaves[i] + update_leaves[i]  # post-update parameter (PEFT order)
        instant = jnp.abs(new[part] * grad_leaves[i]).astype(jnp.float32)  # eq. 8
        old_sens, old_unc = state.sensitivity[path][part], state.uncertainty[path][part]
        new_sens = b1 * old_sens + (1 - b1) * instant  # eq. 9
        new_unc = b2 * old_unc + (1 - b2) * jnp.abs(instant - new_sens)  # eq. 10
        sens[part] = jnp.where(collecting, new_sens, old_sens)
        unc[part] = jnp.where(collecting, new_unc, old_unc)
      score = triplet_score(layer, sens, unc)
      if axis_name is not None:
        score = jax.lax.pmean(score, axis_name)
      sensitivity[path], uncertainty[path] = sens, unc
      scores[path], new_values[path] = score, new

    paths = list(layers)
    top = _budget.top_budget_masks([scores[p] for p in paths], budget)  # eq. 6
    rank_masks = {
        p: jnp.where(mask_event, m, state.rank_masks[p]) for p, m in zip(paths, top)
    }
    apply_mask = mask_event | in_final_phase
    gate_updates = {}
    for path, layer in layers.items():
      drop = apply_mask & ~rank_masks[path]
      old_gate = leaves[layer.gate]
      # Λ ← 0 where dropped: the update is -Λ (exactly zero after apply_updates).
      gate_updates[layer.gate] = jnp.where(drop, -old_gate, update_leaves[layer.gate])

    # PEFT resets the EMAs right after the final allocation.
    reset = step == final_step
    sensitivity = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), sensitivity)
    uncertainty = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), uncertainty)
    new_state = AdaLoraState(
        count=optax.safe_increment(step),
        inner_state=inner_state,
        sensitivity=sensitivity,
        uncertainty=uncertainty,
        rank_masks=rank_masks,
        budget=budget,
    )
    return _tree.replace_leaves(inner_updates, gate_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_adalora_state(state) -> AdaLoraState:
  """The :class:`AdaLoraState` inside any optax state (chain, MultiSteps, inject_hyperparams)."""
  found = [
      s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, AdaLoraState))
      if isinstance(s, AdaLoraState)
  ]
  if not found:
    raise ValueError("No jaxrank.adalora state in this optimizer state.")
  if len(found) > 1:
    raise ValueError(f"Found {len(found)} jaxrank.adalora states; pass the one you want.")
  return found[0]


def adalora_rank_pattern(state) -> dict[str, Array]:
  """Per layer path, a bool per rank (True = kept): PEFT's ``rank_pattern``, at any step.

  ``state`` may be the :func:`adalora` state or any optax state containing it.
  """
  return dict(find_adalora_state(state).rank_masks)
