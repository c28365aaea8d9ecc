"""AdaLoRA (Zhang et al., 2023): SVD-form adapters and a sensitivity-based global rank budget.

Two pieces:

* :class:`AdaLoRA`, the adapter spec. ``Δ = P Λ Q`` (eq. 3). In jaxrank's layout ``down`` is
  ``Q^T`` with shape ``(*in_shape, r)`` (``lora/.../Q``, PEFT ``lora_A`` transposed), ``up`` is
  ``P^T`` with shape ``(r, *out_shape)`` (``lora/.../P``, PEFT ``lora_B`` transposed) and the
  singular values ``Λ`` are the gate ``gates/.../singular_values`` (PEFT ``lora_E``); it lives in
  ``_adalora_spec.py``.
* :func:`adalora`, an optax transformation that wraps the inner optimizer (like
  ``optax.contrib.sam``). After the inner update it scores every triplet with the smoothed
  sensitivity × uncertainty (eq. 7–11), shrinks the number of kept singular values along PEFT's
  cubic budget and zeroes the ``Λ`` entries outside the global top-``b(t)`` (eq. 6).

The orthogonality penalty (eq. 4) is :func:`jaxrank.orthogonality_penalty`; add it to the loss
(``form="paper"``: squared and summed, the default; ``form="peft"``: PEFT's unsquared mean, use
it with weight ``orth_reg_weight=0.5`` to reproduce PEFT), or let the transform add its gradient
(``orth_weight``, normalised to the task gradient by default: ``_adalora_orthogonality.py``).

Step convention (PEFT's): the ``t``-th call of ``update`` (``t = 0, 1, ...``, the count of
optimizer steps already taken) plays the role of PEFT's ``update_and_allocate(global_step=t)``,
called after ``optimizer.step()``. Within one call, in PEFT's order:

1. the inner optimizer's update ``u`` and the post-update parameters ``w' = w + u``;
2. while ``t < total_step - tfinal``: ``I = |w' · g|`` with ``g`` the gradient passed in (eq. 8),
   ``Ī ← β1 Ī + (1 − β1) I`` (eq. 9), ``Ū ← β2 Ū + (1 − β2) |I − Ī|`` with the *new* ``Ī``
   (eq. 10);
3. the triplet score ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with ``s = Ī · Ū``
   (eq. 7, 11), or ``|λ_i| ||P_*i|| ||Q_i*||`` (``importance="magnitude"``), in
   ``_adalora_importance.py``;
4. the budget ``b(t)`` (:func:`adalora_budget_schedule`, in ``_adalora_budget.py``); a mask event when ``tinit < t < total_step −
   tfinal`` and ``t % deltaT == 0``, or ``t == total_step − tfinal`` (the final allocation,
   budget ``target_r · n``, after which the EMAs are reset as PEFT does); at a mask event the
   ``Λ`` entries whose score is not above the ``(n_total − b)``-th smallest are set to zero
   (eq. 6, PEFT's ``kthvalue``/``<=`` rule, see :func:`jaxrank.budget_threshold`);
5. for ``t > total_step − tfinal`` the frozen final mask is reapplied every step; past
   ``total_step`` (a run longer than announced) the final pattern is kept, never recomputed.

Masking between events (``compat``). Eq. 6 prunes at *every* step,
``Λ^(t+1) = T(Λ̃^(t), S^(t))``; the top-``b(t)`` set is recomputed every ``deltaT`` steps and

* ``compat="paper"`` (default) applies the latest pattern after every update, so a masked
  ``λ_i`` is exactly 0 at every step and :func:`jaxrank.rank_pattern`, :func:`jaxrank.compact`
  and the PEFT export, which read ``Λ ≠ 0``, follow the allocator. ``P``/``Q`` and the optimizer
  state of masked triplets are kept and ``λ_i`` gets its gradient step before the mask (``Ī`` is
  measured on ``λ̃``), so a triplet dropped by mistake can win its place back at the next event
  (the paper's "potential of future recovery");
* ``compat="peft"`` masks only at events (PEFT's ``mask_to_budget``), so masked ``λ_i`` regrow
  in between and ``Λ ≠ 0`` over-counts the kept ranks until the next event; read
  :func:`jaxrank.adalora_rank_pattern` then.

The budget is a traced value read from a table, so it never triggers recompilation.

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

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _adalora_budget
from jaxrank import _adalora_importance
from jaxrank import _adalora_orthogonality
from jaxrank import _budget
from jaxrank import _nonfinite
from jaxrank import _orthogonalize
from jaxrank import _tree
from jaxrank._adalora_spec import AdaLoRA

Array = jax.Array


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
    grad_scale: the EMA ``ρ̄`` of ``RMS(∇C)`` on ``P``, ``Q`` (uncorrected; normalises the
      in-transform orthogonality term, 0 when that is off).
    nonfinite_count: updates skipped because the gradient or the loss was not finite (the
      scores, EMAs and pattern then stay as they were).
  """

  count: Array
  inner_state: Any
  sensitivity: dict
  uncertainty: dict
  rank_masks: dict
  budget: Array
  grad_scale: Array
  nonfinite_count: Array


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
    compat: str = "paper",
    importance: str = "sensitivity",
    orth_weight: jax.typing.ArrayLike = 0.0,
    orth_form: str = "paper",
    orth_normalize: bool = True,
    orth_beta: float = 0.9,
    orthogonalize: bool = False,
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
    compat: ``"paper"`` (the latest pattern after every update, eq. 6) or ``"peft"`` (only at
      mask events; masked values regrow in between); see the module doc.
    importance: ``"sensitivity"`` (eq. 7–11, the paper's choice) or ``"magnitude"``
      (``|λ_i| ||P_*i|| ||Q_i*||``), see ``_adalora_importance.py``.
    orth_weight: γ of the orthogonality term (eq. 4) added to the gradient inside the
      transform (0: off; may be traced). For the literal objective ``C + γ Σ_k R`` add
      :func:`jaxrank.orthogonality_penalty` to the loss instead (or ``orth_normalize=False``).
    orth_form: ``"paper"`` (squared, summed) or ``"peft"`` (unsquared mean).
    orth_normalize: True (jaxrank): ``∇C + γ ρ̄_t ∇R`` with ``ρ̄_t`` the bias-corrected EMA of
      ``RMS(∇C)``, independent of the loss scale; False: ``∇C + γ ∇R`` (the paper).
    orth_beta: EMA factor of ``ρ̄``.
    orthogonalize: True (jaxrank's, opt-in): at every mask event the live
      triplets of each matrix are rewritten as the exact SVD of ``Q diag(Λ) P`` (unit singular
      vectors, ``λ_j`` = singular value; ``ΔW`` unchanged, :mod:`jaxrank._orthogonalize`)
      before scoring; the inner first moments are zeroed (second moments, schedules go on).
      The orthogonality term only approximates the SVD form eq. 3 assumes; with it exact,
      ``importance="magnitude"`` ranks true singular values. False: the paper's triplets.
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
  _adalora_importance.check(importance)
  for name, value in (("compat", compat), ("orth_form", orth_form)):
    if value not in ("paper", "peft"):
      raise ValueError(f"{name} must be 'paper' or 'peft', got {value!r}.")
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
        grad_scale=jnp.zeros((), jnp.float32),
        nonfinite_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    layers, leaves = layers_of(params)
    grad_leaves = _tree.leaves_by_key(updates)
    if set(grad_leaves) != set(leaves):
      raise ValueError("jaxrank.adalora: updates and params have different tree structures.")
    grad_scale = state.grad_scale
    if not _adalora_orthogonality.is_off(orth_weight):  # ∇C + γ ρ̄ ∇R (eq. 4)
      factor_grads, grad_scale = _adalora_orthogonality.add_gradient(
          grad_leaves, leaves, layers, grad_scale, state.count, weight=orth_weight,
          form=orth_form, normalize=orth_normalize, beta=orth_beta, axis_name=axis_name)
      updates = _tree.replace_leaves(updates, factor_grads)
      grad_leaves = {**grad_leaves, **factor_grads}
    inner_updates, inner_state = inner_optimizer.update(
        updates, state.inner_state, params, **extra_args)
    update_leaves = _tree.leaves_by_key(inner_updates)

    n_matrices = sum(int(np.prod(jnp.shape(leaves[l.gate])[:-1])) for l in layers.values())
    init_budget = n_matrices * init_r
    budget_table, event_table = _adalora_budget.schedule_tables(
        init_budget, target_r * n_matrices, tinit, tfinal, total_step, deltaT)
    step = state.count
    table_index = jnp.minimum(step, total_step)
    budget = jnp.asarray(budget_table)[table_index]
    # Past total_step nothing is recomputed: the final pattern stays (the EMAs were reset).
    mask_event = jnp.asarray(event_table)[table_index] & (step <= total_step)
    collecting = step < final_step
    in_final_phase = step > final_step

    if orthogonalize:  # the live triplets as the exact SVD of each update (jaxrank)
      rotate = mask_event & collecting

      def rotated(given):
        out = dict(given)
        for layer in layers.values():
          parts = (layer.down, layer.up, layer.gate)
          stepped = [leaves[i] + given[i] for i in parts]
          for i, new in zip(parts, _orthogonalize.svd_form(*stepped, split="values")):
            out[i] = (new - leaves[i]).astype(given[i].dtype)
        return out

      factors = {i: update_leaves[i] for l in layers.values() for i in (l.down, l.up, l.gate)}
      # jnp.where, not lax.cond: a cond around sharded SVDs deadlocked XLA:CPU's collectives
      factors = jax.tree.map(lambda new, old: jnp.where(rotate, new, old), rotated(factors),
                             factors)
      inner_updates = _tree.replace_leaves(inner_updates, factors)
      update_leaves = {**update_leaves, **factors}
      inner_state = _orthogonalize.zero_first_moments(inner_state, rotate)

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
        new_sens, new_unc = _adalora_importance.smoothed(old_sens, old_unc, instant, b1, b2)
        sens[part] = jnp.where(collecting, new_sens, old_sens)
        unc[part] = jnp.where(collecting, new_unc, old_unc)
      if importance == "sensitivity":  # eq. 7, 11
        score = _adalora_importance.sensitivity_score(sens, unc, layer.stacked_axes)
      else:  # |λ_i| ||P_*i|| ||Q_i*||
        score = _adalora_importance.magnitude_score(new, layer.stacked_axes)
      if axis_name is not None:
        score = jax.lax.pmean(score, axis_name)
      sensitivity[path], uncertainty[path] = sens, unc
      scores[path], new_values[path] = score, new

    paths = list(layers)
    top = _budget.top_budget_masks([scores[p] for p in paths], budget)  # eq. 6
    rank_masks = {
        p: jnp.where(mask_event, m, state.rank_masks[p]) for p, m in zip(paths, top)
    }
    # eq. 6 at every step ("paper"), or only at events and in the final phase ("peft")
    apply_mask = True if compat == "paper" else mask_event | in_final_phase
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
        grad_scale=grad_scale,
        nonfinite_count=state.nonfinite_count,
    )
    return _tree.replace_leaves(inner_updates, gate_updates), new_state

  # NaN scores would mask every triplet: a non-finite update changes nothing and is counted
  return optax.GradientTransformationExtraArgs(init_fn, _nonfinite.skip_if_not_finite(update_fn))


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
