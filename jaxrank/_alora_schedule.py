"""ALoRA's schedule (Liu et al., NAACL 2024, Algorithm 1) as an optax transform, and one round.

:func:`alora` wraps the inner optimizer: ``K1`` warmup steps, then ``N_A`` rounds every ``K2``
steps, each round scoring (``_alora_scoring.py``), pruning and reallocating
(``_alora_reallocation.py``) inside ``lax.cond``, so one jitted step does everything.
:func:`alora_round` is the same round for loops that run it between epochs, and
:func:`alora_freeze_masks` keeps such a loop's own optimizer off the mask leaves. The module
docstring of ``jaxrank/_alora.py`` has the method and an end-to-end example.

Example:
  >>> import jaxrank
  >>> jaxrank.alora_check_schedule(warmup_steps=2, recovery_steps=2, num_rounds=3, total_steps=8)
  >>> jaxrank.alora_check_schedule(2, 2, 4, total_steps=8)
  Traceback (most recent call last):
  ...
  ValueError: K1 + N_A * K2 = 2 + 4 * 2 = 10 optimizer steps exceed total_steps=8: ...
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _alora
from jaxrank import _alora_reallocation
from jaxrank import _alora_scoring
from jaxrank import _nonfinite
from jaxrank import _orthogonalize
from jaxrank import _tree

Array = jax.Array


def alora_round(
    loss_fn: _alora.LossFn,
    model_or_adapter,
    params,
    batch,
    *,
    rng: Array,
    num_prune: Optional[int] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    opt_state=None,
    chunk_size: int = 32,
    keep_budget: bool = True,
):
  """Scores, prunes, reallocates and (given ``optimizer, opt_state``) resets new slots' state.

  For loops that run the ALoRA rounds between epochs (wrap their optimizer in
  :func:`alora_freeze_masks`). ``keep_budget``: see :func:`jaxrank.reallocation_plan`.

  Returns:
    ``(params, opt_state, scores, Reallocation)``.
  """
  scores = _alora_scoring.ablation_scores(
      loss_fn, model_or_adapter, params, batch, chunk_size=chunk_size)
  new_params, info = _alora_reallocation.prune_and_reallocate(
      model_or_adapter, params, scores, num_prune=num_prune, rng=rng, keep_budget=keep_budget)
  if optimizer is not None and opt_state is not None:
    opt_state = _alora_reallocation.alora_reset_optimizer_state(
        model_or_adapter, opt_state, optimizer.init(new_params), new_params, info.added)
  return new_params, opt_state, scores, info


def alora_freeze_masks(
    inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` with zero updates on every ALoRA mask leaf (``gates/.../mask``).

  For loops that call :func:`alora_round` between epochs with their own optimizer: the mask
  then changes only in rounds, bit for bit (the :func:`alora` transform does this itself).
  Without it, decoupled weight decay shrinks the leaf; the gate (``1[mask ≠ 0]``) and the
  rank pattern do not change, but the stored values do.

  Example:
    >>> import jax.numpy as jnp, optax, jaxrank
    >>> params = {"gates": {"l": {"mask": jnp.ones(2)}}, "lora": {"l": {"A": jnp.ones(2)}}}
    >>> tx = jaxrank.alora_freeze_masks(optax.adamw(0.1, weight_decay=0.5))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["gates"]["l"]["mask"].tolist(), bool(updates["lora"]["l"]["A"][0] != 0)
    ([0.0, 0.0], True)
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    return jax.tree_util.tree_map_with_path(
        lambda k, u: jnp.zeros_like(u) if _tree.is_named_leaf(k, _alora.MASK, _tree.GATES)
        else u, updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)



# --------------------------------------------------------------------------------------------
# The schedule as an optax transformation
# --------------------------------------------------------------------------------------------


def alora_orthogonalize(model_or_adapter, params):
  """Every matrix's live ranks rewritten in the SVD form of its update (``ΔW`` and masks
  unchanged), so that eq. 6 ablates one singular direction per rank instead of one of several
  non-orthogonal pieces of the same direction (jaxrank's; :mod:`jaxrank._orthogonalize`)."""
  adapter = _alora.alora_spec(model_or_adapter)
  slots = _alora.Slots.of(adapter, params)
  leaves = _tree.leaves_by_key(params)
  new = {}
  for layer in slots.layers:
    keys = [slots.key(layer, c, n) for c, n in (("lora", adapter.down_name),
                                                 ("lora", adapter.up_name), ("gates", _alora.MASK))]
    down, up, _ = _orthogonalize.svd_form(*(leaves[k] for k in keys), split="factors")
    new[keys[0]], new[keys[1]] = down, up
  return _tree.replace_leaves(params, new)


class ALoRAState(NamedTuple):
  """State of :func:`alora`."""

  count: Array  # optimizer steps done
  rounds_done: Array
  rng: Array
  last_scores: Any  # per layer path, the scores of the latest round (nan before/dead)
  inner_state: Any
  # updates skipped for a non-finite gradient/loss, plus rounds not applied because a live
  # rank's validation score was not finite (the masks then stay as they were)
  nonfinite_count: Array


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
    loss_fn: _alora.LossFn,
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
    keep_budget: bool = True,
    orthogonalize: bool = False,
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
    keep_budget: True (default, jaxrank's): every round re-adds exactly the ranks it pruned,
      so the total live rank stays ``num_modules × initial_rank``
      (:func:`jaxrank.reallocation_plan`); False: the paper's rule, under which the total
      shrinks when no receiver has room.
    orthogonalize: True (jaxrank's, opt-in): before scoring, each matrix's live
      ranks are rewritten in the SVD form of its update (:func:`alora_orthogonalize`, the
      function unchanged); the inner first moments are zeroed (second moments, schedules go on).
      LoRA's ranks are not orthogonal, so one direction of the update is often split over
      several ranks; every piece of the split then looks important to eq. 6's one-rank
      ablations. False: the paper's scores of the ranks as trained.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update(updates, state, params, *,
    validation_batch=None, **extra_args)`` needs ``params``.
  """
  adapter = _alora.alora_spec(model_or_adapter)
  alora_check_schedule(warmup_steps, recovery_steps, num_rounds, total_steps)
  if ranks_per_round is not None and (not isinstance(ranks_per_round, int) or ranks_per_round < 1):
    raise ValueError(f"ranks_per_round (n_A) must be a positive int, got {ranks_per_round!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  inner = alora_freeze_masks(inner)  # gate leaves get zero updates; only rounds write them
  default_batch = validation_batch

  def resolve(slots: _alora.Slots) -> int:
    return slots.num_modules if ranks_per_round is None else ranks_per_round

  def init_fn(params):
    slots = _alora.Slots.of(adapter, params)
    n_a = resolve(slots)
    flat = slots.flatten(slots.masks(params))
    bound = slots.num_modules * adapter.initial_rank
    if _alora.is_concrete(flat):
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
        nonfinite_count=jnp.zeros([], jnp.int32),
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
    slots = _alora.Slots.of(adapter, params)
    n_a = resolve(slots)
    limit = slots.num_modules * adapter.initial_rank
    chunk = min(chunk_size, limit)
    gate_keys = {slots.key(l, "gates", _alora.MASK) for l in slots.layers}

    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    count = state.count + 1
    since = count - warmup_steps
    is_round = ((since >= 0) & (since % recovery_steps == 0)
                & (since // recovery_steps < num_rounds))

    def do_round(operand):
      inner_updates, inner_state, rng = operand
      rng, key = jax.random.split(rng)
      stepped = optax.apply_updates(params, inner_updates)
      if orthogonalize:
        stepped = alora_orthogonalize(adapter, stepped)
      flat_scores, _ = _alora_scoring.scores_flat(loss_fn, slots, stepped, batch, chunk, limit)
      if axis_name is not None:
        flat_scores = jax.lax.pmean(flat_scores, axis_name)
      live = slots.flatten(slots.masks(stepped)) != 0  # dead slots score NaN by design
      scores_finite = jnp.all(jnp.where(live, jnp.isfinite(flat_scores), True))
      scores = slots.unflatten(flat_scores)
      rounded, info = _alora_reallocation.prune_and_reallocate(
          adapter, stepped, scores, num_prune=n_a, rng=key, keep_budget=keep_budget)
      if orthogonalize:  # every live factor moved: zero the first moments
        inner_state = _orthogonalize.zero_first_moments(inner_state)
      inner_state = _alora_reallocation.alora_reset_optimizer_state(
          adapter, inner_state, inner.init(rounded), rounded, info.added)
      added = slots.slot_masks_for_leaves(info.added)
      rotated = {slots.key(l, "lora", n) for l in slots.layers
                 for n in (adapter.down_name, adapter.up_name)} if orthogonalize else set()

      def new_update(keypath, update, old, new):
        name = _tree.keypath_names(keypath)
        if name in rotated:
          return (new - old).astype(update.dtype)
        if name in gate_keys:  # 0/1 gates: old + (new - old) == new exactly
          return (new - old).astype(update.dtype)
        if name in added:  # new slots: A re-initialised, B = 0 (exactly: old + -old)
          return jnp.where(added[name], (new - old).astype(update.dtype), update)
        return update

      new_updates = jax.tree_util.tree_map_with_path(new_update, inner_updates, params, rounded)
      applied = (new_updates, inner_state, rng, jax.tree.map(
          lambda s: s.astype(jnp.float32), scores), jnp.ones([], bool))
      # a NaN score must never prune a rank: the round is not applied, and counted
      skipped = (*no_round(operand)[:4], jnp.zeros([], bool))
      return _nonfinite.select(scores_finite, applied, skipped)

    def no_round(operand):
      inner_updates, inner_state, rng = operand
      return inner_updates, inner_state, rng, state.last_scores, jnp.zeros([], bool)

    new_updates, inner_state, rng, scores, applied = jax.lax.cond(
        is_round, do_round, no_round, (inner_updates, inner_state, state.rng))
    return new_updates, ALoRAState(
        count=count,
        rounds_done=state.rounds_done + applied.astype(jnp.int32),
        rng=rng,
        last_scores=scores,
        inner_state=inner_state,
        nonfinite_count=state.nonfinite_count + (is_round & ~applied).astype(jnp.int32),
    )

  # a non-finite gradient or loss changes nothing (masks, scores, round counter) and is counted
  return optax.GradientTransformationExtraArgs(init_fn, _nonfinite.skip_if_not_finite(update_fn))
