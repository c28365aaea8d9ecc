"""One call per rank method: everything a training loop needs, from the library's defaults.

Each factory returns a :class:`jaxrank.Recipe`: the adapter spec, a builder of the method's
optax transform, the extra loss term, preparation/finalisation of the variables, the rank
pattern reader and the rng streams of a step. Every method takes the same budget vocabulary:

* ``rank``: the per-matrix capacity ``r_max`` of the dynamic methods (default 8);
* ``budget_rank``: the final *average* live rank per adapted matrix that the method ends at
  (default 4; plain LoRA trains exactly this rank);
* ``total_steps``: optimizer steps of the run, which place the method's schedule (default
  ``None``: the loop's own step count, :attr:`jaxrank.RecipeContext.total_steps`);
* ``init_fraction`` and ``final_fraction``: the schedule as fractions of ``total_steps``: the
  budget starts to bind after step ``init_fraction·T`` and the pattern is final after
  ``t_final = final_fraction·T``; the steps after it fine-tune the surviving ranks (recovery).
  Defaults per method: SVD —/0.6, SoRA 0.45/0.6, SaLoRA 0/0.6, AdaLoRA 0.1/0.6 (its
  ``tinit`` and final allocation), ALoRA 0.2 (warmup)/0.7 (its last round); LoRA ignores them;
* ``alpha``: LoRA's scale numerator (default ``None``: 2 × the rank the adapter starts with);
* ``dropout`` on the adapter input and ``weight_decay`` of the factors' AdamW (default 0).

Every dynamic method reaches exactly ``budget_rank × matrices`` live ranks by itself inside
the jitted step (no cut after training). The method's own knobs follow, each with the default
the demo and the benchmarks use.
:data:`RECIPES` maps every name to its factory and :func:`recipe` looks one up; a new method
is its method file, one factory here and one registry line.

Example:
  >>> from jaxrank import recipes
  >>> sorted(recipes.RECIPES)
  ['adalora', 'alora', 'frozen', 'lora', 'salora', 'sora', 'svd']
  >>> r = recipes.recipe("sora", rank=8, budget_rank=2)
  >>> r.name, r.adapter.rank, r.adapter.alpha, r.finalize is None  # no post-hoc cut
  ('sora', 8, 16.0, True)
  >>> recipes.recipe("lora", rank=8, budget_rank=2).adapter.rank  # LoRA at the budget
  2
  >>> recipes.recipe("dora")
  Traceback (most recent call last):
  ...
  ValueError: unknown recipe 'dora'; choose from frozen, lora, sora, adalora, salora, alora, svd.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import optax

import jaxrank
from jaxrank import _recipe
from jaxrank._recipe import default_alpha
from jaxrank._recipe import Recipe
from jaxrank._recipe import RecipeContext


def _steps(total_steps: Optional[int], ctx: RecipeContext) -> int:
  return ctx.total_steps if total_steps is None else total_steps


def _final_step(total_steps: int, fraction: float) -> int:
  """``round(fraction · T)`` inside ``[1, T − 1]``."""
  return max(1, min(total_steps - 1, int(round(fraction * total_steps))))


def frozen_recipe(*, rank: Optional[int] = None, budget_rank: Optional[int] = None,
                  total_steps: Optional[int] = None, alpha: Optional[float] = None,
                  init_fraction: Optional[float] = None,
                  final_fraction: Optional[float] = None) -> Recipe:
  """The frozen-model baseline: no adapters, only the task head trains.

  The budget arguments are accepted (so every recipe takes the same call) and ignored.
  """
  del rank, budget_rank, total_steps, alpha, init_fraction, final_fraction
  return _recipe.frozen()


def lora_recipe(*, rank: int = 8, budget_rank: Optional[int] = None,
                total_steps: Optional[int] = None, alpha: Optional[float] = None,
                dropout: float = 0.0, weight_decay: float = 0.0,
                init_fraction: Optional[float] = None,
                final_fraction: Optional[float] = None) -> Recipe:
  """Plain LoRA (Hu et al., 2021): a fixed rank, AdamW on the factors.

  Args:
    rank: the rank of every adapter when ``budget_rank`` is None.
    budget_rank: the rank of every adapter, when given: the uniform-LoRA baseline at a budget.
    total_steps, init_fraction, final_fraction: unused (LoRA has no schedule).
    alpha: LoRA's alpha (default 2 × the trained rank).
    dropout, weight_decay: adapter-input dropout and the factors' AdamW weight decay.
  """
  del total_steps, init_fraction, final_fraction
  return _recipe.lora(rank=rank if budget_rank is None else budget_rank, alpha=alpha,
                      dropout=dropout, weight_decay=weight_decay)


def svd_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
               alpha: Optional[float] = None, dropout: float = 0.0, weight_decay: float = 0.0,
               init_fraction: Optional[float] = None, final_fraction: float = 0.6) -> Recipe:
  """The SVD-truncation baseline (:func:`jaxrank.svd_truncation`): LoRA at ``rank`` until
  ``t_final = final_fraction·T`` (default 0.6), one global singular-value cut to
  ``budget_rank × matrices`` ranks inside the step, then recovery. ``alpha`` defaults to
  2 × ``rank``; ``init_fraction`` is unused (the cut is one step)."""
  del init_fraction
  spec = jaxrank.SVDTruncation(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)

  def optimizer(ctx):
    cut = _final_step(_steps(total_steps, ctx), final_fraction)
    return jaxrank.svd_truncation(optax.adamw(ctx.schedule, weight_decay=weight_decay),
                                  budget=budget_rank * ctx.num_matrices, cut_step=cut - 1,
                                  scale=spec.scale)

  return Recipe(name="svd", adapter=spec, optimizer=optimizer)


def sora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                alpha: Optional[float] = None, dropout: float = 0.0, weight_decay: float = 0.0,
                lam: float = 0.1, init_fraction: float = 0.45, final_fraction: float = 0.6,
                normalize: bool = True, orthogonalize_every: Optional[int] = 50) -> Recipe:
  """SoRA (Ding et al., 2023) at a budget (:func:`jaxrank.sora_budget`).

  AdamW on factors and gates, then the gates' prox (threshold ``lam`` × learning rate, λ = 0.1)
  under a budget that shrinks (cubic) from capacity at ``init_fraction·T`` (0.45) to
  ``budget_rank × matrices`` at ``final_fraction·T`` (0.6), then recovery with the pattern
  frozen: the run ends at exactly the budget, with no cut after training.

  ``normalize=True`` (jaxrank): the threshold is relative to the task loss and in Adam's
  metric, so the default λ holds when the loss is scaled. ``orthogonalize_every=50`` (jaxrank):
  every 50 pruning steps each layer is rewritten in the SVD form of its core and the optimizer
  restarts its first moments, so scores are singular values. The paper's form is ``normalize=False,
  orthogonalize_every=None, init_fraction=0.1``. ``alpha`` defaults to 2 × ``rank``.
  """
  spec = jaxrank.SoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    t_final = _final_step(steps, final_fraction)
    t_init = min(_final_step(steps, init_fraction), t_final - 1)  # at least one pruning step
    return jaxrank.sora_budget(optax.adamw(ctx.schedule, weight_decay=weight_decay),
                               ctx.schedule, budget=budget_rank * ctx.num_matrices,
                               t_init=t_init, t_final=t_final, lam=lam,
                               normalize=normalize, orthogonalize_every=orthogonalize_every)

  return Recipe(name="sora", adapter=spec, optimizer=optimizer)


def adalora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                   alpha: Optional[float] = None, dropout: float = 0.0,
                   weight_decay: float = 0.0, orthogonality_weight: float = 1.0,
                   orthogonality_form: str = "paper", orthogonality_normalize: bool = True,
                   init_std: Optional[float] = None, importance: str = "sensitivity",
                   orthogonalize: bool = False,
                   lr_factor: float = 1.0, tinit: Optional[int] = None,
                   tfinal: Optional[int] = None, delta_t: int = 10, init_fraction: float = 0.1,
                   final_fraction: float = 0.6) -> Recipe:
  """AdaLoRA (Zhang et al., 2023): :func:`jaxrank.adalora` around AdamW on ``P, Λ, Q``.

  The transform reaches exactly ``budget_rank × matrices`` triplets by itself at the final
  allocation (``final_fraction·T``) and fine-tunes that pattern to the end: no cut after
  training, and ``Λ ≠ 0`` is the allocator's pattern at every step (``compat="paper"``).

  Args:
    rank, budget_rank: ``init_r`` and ``target_r`` (the budget is reached by the schedule).
    total_steps: the schedule's ``total_step`` (default: the run's steps).
    alpha: default 2 × ``rank``.
    orthogonality_weight, orthogonality_form, orthogonality_normalize: γ of eq. 4 inside the
      transform (default 1, the paper's form) and its normalisation ``∇C + γ ρ̄ ∇R`` (jaxrank's,
      loss-scale free; False: the paper's ``∇C + γ ∇R``), see :func:`jaxrank.adalora`.
    init_std: std of ``P``, ``Q``; ``None`` (default) = ``1/sqrt(fan)``, unit-norm singular
      vectors, so no learning-rate factor is needed (0.02 is PEFT's).
    importance: ``"sensitivity"`` (default, eq. 7–11, the paper's choice) or ``"magnitude"``
      (``|λ_i| ‖P_*i‖ ‖Q_i*‖``, the paper's first option, §3.2).
    orthogonalize: False (default); True (jaxrank's, opt-in): at every mask event the live
      triplets are made the exact SVD of each update before scoring (:func:`jaxrank.adalora`).
      With ``importance="magnitude"`` this found the planted ranks in every setting of
      benchmarks/rank_recovery.py, but left MiniLM untrained in ``jaxrank demo`` (33.9 %
      test accuracy, benchmarks/README.md §4), so it is not the default yet.
    lr_factor: the factors' learning rate is ``lr_factor ×`` the run's schedule (default 1).
    init_fraction, final_fraction: ``tinit = ⌊init_fraction·T⌋`` warmup steps (0.1) and the
      final allocation at ``final_fraction·T`` (0.6), i.e. ``tfinal = T −`` that.
    tinit, tfinal, delta_t: explicit warmup and final fine-tuning steps (they override the
      fractions) and the masking interval ΔT (default 10).
  """
  spec = jaxrank.AdaLoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout,
                         init_std=init_std)

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    warm = max(1, math.floor(init_fraction * steps + 1e-9)) if tinit is None else tinit
    tail = steps - max(warm + 1, _final_step(steps, final_fraction)) if tfinal is None else tfinal
    schedule = lambda step: lr_factor * ctx.schedule(step)
    return jaxrank.adalora(optax.adamw(schedule, weight_decay=weight_decay), init_r=rank,
                           target_r=budget_rank, tinit=warm, tfinal=tail, total_step=steps,
                           deltaT=delta_t, importance=importance,
                           orth_weight=orthogonality_weight, orth_form=orthogonality_form,
                           orth_normalize=orthogonality_normalize,
                           orthogonalize=orthogonalize)

  def pattern(model, variables, opt_state):
    return {k: int(v.sum()) for k, v in jaxrank.adalora_rank_pattern(opt_state).items()}

  return Recipe(name="adalora", adapter=spec, optimizer=optimizer, rank_pattern=pattern)


def salora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                  alpha: Optional[float] = None, dropout: float = 0.0,
                  weight_decay: float = 0.0, lambda_learning_rate: float = 1.0,
                  init_fraction: float = 0.0, final_fraction: float = 0.6,
                  gate_learning_rate: float = 0.05, orthogonality_weight: float = 0.1,
                  normalize: bool = True, orthogonalize: bool = False) -> Recipe:
  """SaLoRA (Hu et al., 2023): hard-concrete gates under a Lagrangian density constraint.

  Factors: AdamW at the run's schedule. ``log θ``: Adam at the constant ``gate_learning_rate``
  (0.05, a logit step) during ``[init_fraction·T, final_fraction·T)`` (0 and 0.6), its state
  advancing only there; λ: projected ascent with ``lambda_learning_rate`` toward the target
  density ``budget_rank / rank``. On the last window step the ``budget_rank × matrices`` ranks
  most likely open are hardened open and the rest closed (inside the step); the remaining
  steps fine-tune them with the gates frozen: no cut after training. ``normalize=True``
  (jaxrank) multiplies β (``orthogonality_weight``) and λ's terms by the task-loss EMA
  (:func:`jaxrank.salora_add_loss_scale`); ``False`` is eq. 12 as written.
  ``orthogonalize=True`` (jaxrank's, opt-in, with ``init_fraction > 0``) rewrites the factors
  in the SVD form of each update just before the window, so every gate decides one singular
  direction (benchmarks/README.md §4 measures ``init_fraction=0.3, orthogonalize=True``). ``alpha``
  defaults to 2 × ``rank``.
  """
  spec = jaxrank.SaLoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)
  density = budget_rank / rank

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    return jaxrank.lagrangian_ascent(
        lambda_learning_rate, optax.adamw(ctx.schedule, weight_decay=weight_decay),
        t_start=int(round(init_fraction * steps)), t_end=_final_step(steps, final_fraction),
        total_steps=steps, gate_optimizer=optax.adam(gate_learning_rate),
        budget=budget_rank * ctx.num_matrices, orthogonalize=orthogonalize)

  def prepare(model, variables):
    variables = jaxrank.add_lagrange_multiplier(variables)
    return jaxrank.salora_add_loss_scale(variables) if normalize else variables

  def penalty(model, variables):
    return jaxrank.salora_penalty(model, variables, target_density=density,
                                  orthogonality_weight=orthogonality_weight)

  return Recipe(name="salora", adapter=spec, optimizer=optimizer, penalty=penalty,
                prepare=prepare, train_rngs=("dropout", spec.rng_name))


def alora_chunk_size(chunk_size: Optional[int] = None) -> int:
  """ALoRA's ranks scored per vmapped call: ``chunk_size``, or by default 1 on CPU (one pair of
  forwards at a time is fastest there and needs the least memory: a MiniLM round takes 16 s
  against 32 s at 32, benchmarks/README.md) and 32 on accelerators."""
  if chunk_size is not None:
    return chunk_size
  import jax
  return 1 if jax.default_backend() == "cpu" else 32


def _first(batch, n: int):
  """The first ``n`` rows of a batch (ALoRA scores every live rank with 2 forwards on it)."""
  return None if batch is None else {k: v[:n] for k, v in batch.items()}


def alora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                 alpha: Optional[float] = None, dropout: float = 0.0, weight_decay: float = 0.0,
                 rounds: int = 5, ranks_per_round: Optional[int] = None,
                 scoring_examples: int = 64, chunk_size: Optional[int] = None,
                 keep_budget: bool = True, orthogonalize: bool = False,
                 init_fraction: float = 0.2, final_fraction: float = 0.7) -> Recipe:
  """ALoRA (Liu et al., 2024): ablation scoring, pruning and reallocation of ranks.

  Every matrix starts with ``budget_rank`` live ranks out of ``rank`` slots. After a warmup
  ``K1 = init_fraction·T`` (0.2), ``rounds`` rounds (5) ``K2`` apart, the last at
  ``final_fraction·T`` (0.7), each score every live rank (eq. 6) on the first
  ``scoring_examples`` rows (64) of the validation batch, ``chunk_size`` ranks per vmapped call
  (:func:`alora_chunk_size`), prune ``ranks_per_round`` ranks (``n_A``, default half the
  matrices) and re-add exactly as many (``keep_budget``, jaxrank's; False: the paper's rule,
  under which the total can shrink). The pattern after the last round is fine-tuned to the end,
  at exactly ``budget_rank × matrices`` live ranks: no cut after training. Rounds that would
  not fit in ``T`` are dropped. ``orthogonalize=True`` (jaxrank's, opt-in): each round first
  rewrites every matrix's live ranks in the SVD form of its update (the function unchanged),
  so eq. 6 ablates one singular direction per rank; the default scores the ranks as trained
  (the paper). It did not improve the allocation in benchmarks/rank_recovery.py and made
  the 1- and 2-device runs of one tiny demo pick different ranks, so it is off. ``alpha`` defaults to 2 × ``budget_rank`` (the initial rank).
  """
  spec = jaxrank.ALoRA(rank=rank, initial_rank=budget_rank,
                       alpha=default_alpha(alpha, budget_rank), dropout=dropout)

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    warmup = max(1, math.floor(init_fraction * steps + 1e-9))
    last = max(warmup + 1, _final_step(steps, final_fraction))
    recovery = max(1, (last - warmup) // max(1, rounds - 1))
    fitting = max(1, min(rounds, (steps - warmup) // recovery))  # K1 + N_A·K2 <= T
    per_round = ranks_per_round or max(1, ctx.num_matrices // 2)
    return jaxrank.alora(optax.adamw(ctx.schedule, weight_decay=weight_decay), spec, ctx.loss_fn,
                         warmup_steps=warmup, recovery_steps=recovery, num_rounds=fitting,
                         ranks_per_round=per_round, total_steps=steps,
                         validation_batch=_first(ctx.validation_batch, scoring_examples),
                         chunk_size=alora_chunk_size(chunk_size), keep_budget=keep_budget,
                         orthogonalize=orthogonalize)

  return Recipe(name="alora", adapter=spec, optimizer=optimizer, separate_head=False)


RECIPES: dict[str, Callable[..., Recipe]] = {
    "frozen": frozen_recipe,
    "lora": lora_recipe,
    "sora": sora_recipe,
    "adalora": adalora_recipe,
    "salora": salora_recipe,
    "alora": alora_recipe,
    "svd": svd_recipe,
}


def recipe(name: str, **options) -> Recipe:
  """The :class:`jaxrank.Recipe` of method ``name`` (a key of :data:`RECIPES`) with ``options``
  passed to its factory (e.g. ``rank``, ``budget_rank``, ``total_steps``)."""
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}.")
  return RECIPES[name](**options)
