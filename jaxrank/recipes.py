"""One call per rank method: everything a training loop needs, from the library's defaults.

Each factory returns a :class:`jaxrank.Recipe`: the adapter spec, a builder of the method's
optax transform, the extra loss term, preparation/finalisation of the variables, the rank
pattern reader and the rng streams of a step. Every method takes the same budget vocabulary:

* ``rank``: the per-matrix capacity ``r_max`` of the dynamic methods (default 8);
* ``budget_rank``: the final *average* live rank per adapted matrix that the method ends at
  (default 4; plain LoRA trains exactly this rank);
* ``total_steps``: optimizer steps of the run, which place the method's schedule (default
  ``None``: the loop's own step count, :attr:`jaxrank.RecipeContext.total_steps`);
* ``alpha``: LoRA's scale numerator (default ``None``: 2 × the rank the adapter starts with);
* ``dropout`` on the adapter input and ``weight_decay`` of the factors' AdamW (default 0).

The method's own knobs follow, each with the default the demo and the benchmarks use.
:data:`RECIPES` maps every name to its factory and :func:`recipe` looks one up; a new method
is its method file, one factory here and one registry line.

Example:
  >>> from jaxrank import recipes
  >>> sorted(recipes.RECIPES)
  ['adalora', 'alora', 'frozen', 'lora', 'salora', 'sora']
  >>> r = recipes.recipe("sora", rank=8, budget_rank=2)
  >>> r.name, r.adapter.rank, r.adapter.alpha, r.finalize is not None
  ('sora', 8, 16.0, True)
  >>> recipes.recipe("lora", rank=8, budget_rank=2).adapter.rank  # LoRA at the budget
  2
  >>> recipes.recipe("dora")
  Traceback (most recent call last):
  ...
  ValueError: unknown recipe 'dora'; choose from frozen, lora, sora, adalora, salora, alora.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import optax

import jaxrank
from jaxrank import _recipe
from jaxrank import _tree
from jaxrank._recipe import default_alpha
from jaxrank._recipe import Recipe
from jaxrank._recipe import RecipeContext

# the |log θ| that jaxrank.salora_harden writes: sigmoid(-50) closes a gate exactly
_CLOSED_LOG_THETA = 50.0


def _steps(total_steps: Optional[int], ctx: RecipeContext) -> int:
  return ctx.total_steps if total_steps is None else total_steps


def frozen_recipe(*, rank: Optional[int] = None, budget_rank: Optional[int] = None,
                  total_steps: Optional[int] = None, alpha: Optional[float] = None) -> Recipe:
  """The frozen-model baseline: no adapters, only the task head trains.

  The budget arguments are accepted (so every recipe takes the same call) and ignored.
  """
  del rank, budget_rank, total_steps, alpha
  return _recipe.frozen()


def lora_recipe(*, rank: int = 8, budget_rank: Optional[int] = None,
                total_steps: Optional[int] = None, alpha: Optional[float] = None,
                dropout: float = 0.0, weight_decay: float = 0.0) -> Recipe:
  """Plain LoRA (Hu et al., 2021): a fixed rank, AdamW on the factors.

  Args:
    rank: the rank of every adapter when ``budget_rank`` is None.
    budget_rank: the rank of every adapter, when given: the uniform-LoRA baseline at a budget.
    total_steps: unused (LoRA has no schedule of its own).
    alpha: LoRA's alpha (default 2 × the trained rank).
    dropout, weight_decay: adapter-input dropout and the factors' AdamW weight decay.
  """
  del total_steps
  return _recipe.lora(rank=rank if budget_rank is None else budget_rank, alpha=alpha,
                      dropout=dropout, weight_decay=weight_decay)


def sora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                alpha: Optional[float] = None, dropout: float = 0.0, weight_decay: float = 0.0,
                lam: float = 0.1) -> Recipe:
  """SoRA (Ding et al., 2023): AdamW, then the proximal step on the gates ``g``.

  ``lam`` is the sparsity strength λ of :func:`jaxrank.sora_prox` (its threshold is
  ``lam × learning rate``). After training at most ``budget_rank × matrices`` ranks stay: the
  live ranks of highest ``|g|``, the others get ``g = 0`` (SoRA's own pruned value).
  ``alpha`` defaults to 2 × ``rank``; ``total_steps`` is unused.
  """
  del total_steps
  spec = jaxrank.SoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)
  gate = spec.gate_names[0]

  def optimizer(ctx):
    return optax.chain(optax.adamw(ctx.schedule, weight_decay=weight_decay),
                       jaxrank.sora_prox(lam, ctx.schedule))

  def finalize(model, variables, opt_state):
    return _tree.keep_top_ranks(model, variables, budget_rank, gate, score=np.abs,
                                dropped=np.zeros_like)

  return Recipe(name="sora", adapter=spec, optimizer=optimizer, finalize=finalize)


def adalora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                   alpha: Optional[float] = None, dropout: float = 0.0,
                   weight_decay: float = 0.0, orthogonality_weight: float = 0.1,
                   orthogonality_form: str = "paper", lr_factor: float = 5.0,
                   tinit: Optional[int] = None, tfinal: Optional[int] = None,
                   delta_t: Optional[int] = None) -> Recipe:
  """AdaLoRA (Zhang et al., 2023): :func:`jaxrank.adalora` around AdamW on ``P, Λ, Q``.

  Args:
    rank, budget_rank: ``init_r`` and ``target_r`` (the budget is reached by the schedule).
    total_steps: the schedule's ``total_step`` (default: the run's steps).
    alpha: default 2 × ``rank``.
    orthogonality_weight, orthogonality_form: the loss term
      ``weight × jaxrank.orthogonality_penalty(form=...)`` (0.1, the paper's form).
    lr_factor: the factors' learning rate is ``lr_factor ×`` the run's schedule (default 5:
      PEFT's initialisation, ``P, Q ~ N(0, 0.02²)``, ``Λ = 0``, starts the update far smaller
      than LoRA's; 5 × 2e-3 reached 96.8 % test accuracy on BBC News in 60 steps against
      91.4 %, no better than the frozen encoder, at 2e-3). The head keeps the common rate.
    tinit, tfinal, delta_t: the budget schedule's warmup, final fine-tuning and masking
      interval (default ``steps // 10``, ``steps // 5`` and ``steps // 50``, each at least 1).
  """
  spec = jaxrank.AdaLoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)
  pick = lambda value, fraction, steps: max(1, steps // fraction) if value is None else value

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    schedule = lambda step: lr_factor * ctx.schedule(step)
    return jaxrank.adalora(optax.adamw(schedule, weight_decay=weight_decay), init_r=rank,
                           target_r=budget_rank, tinit=pick(tinit, 10, steps),
                           tfinal=pick(tfinal, 5, steps), total_step=steps,
                           deltaT=pick(delta_t, 50, steps))

  def penalty(model, variables):
    return orthogonality_weight * jaxrank.orthogonality_penalty(model, variables,
                                                                form=orthogonality_form)

  def pattern(model, variables, opt_state):
    return {k: int(v.sum()) for k, v in jaxrank.adalora_rank_pattern(opt_state).items()}

  return Recipe(name="adalora", adapter=spec, optimizer=optimizer, penalty=penalty,
                rank_pattern=pattern)


def salora_recipe(*, rank: int = 8, budget_rank: int = 4, total_steps: Optional[int] = None,
                  alpha: Optional[float] = None, dropout: float = 0.0,
                  weight_decay: float = 0.0, lambda_learning_rate: float = 1.0,
                  lambda_window: tuple[float, float] = (0.0, 0.8)) -> Recipe:
  """SaLoRA (Hu et al., 2023): hard-concrete gates under a Lagrangian density constraint.

  The target density is ``budget_rank / rank``; :func:`jaxrank.lagrangian_ascent` moves λ by
  ``lambda_learning_rate`` per step inside ``lambda_window`` (fractions of the run's steps:
  the constraint ramps from 0 % to 80 % of training). After training the gates are hardened
  (:func:`jaxrank.salora_harden`) and at most ``budget_rank × matrices`` ranks, those of
  highest ``log θ``, stay open. ``alpha`` defaults to 2 × ``rank``.
  """
  spec = jaxrank.SaLoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)
  density = budget_rank / rank
  gate = spec.gate_names[0]
  start, end = lambda_window

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    return jaxrank.lagrangian_ascent(lambda_learning_rate,
                                     optax.adamw(ctx.schedule, weight_decay=weight_decay),
                                     t_start=int(steps * start),
                                     t_end=max(1, int(steps * end)))

  def finalize(model, variables, opt_state):
    hard = jaxrank.salora_harden(model, variables, rule="budget")
    return _tree.keep_top_ranks(
        model, hard, budget_rank, gate, score=lambda t: t,
        dropped=lambda t: np.full_like(t, -_CLOSED_LOG_THETA))

  return Recipe(
      name="salora", adapter=spec, optimizer=optimizer,
      penalty=lambda model, v: jaxrank.salora_penalty(model, v, target_density=density),
      prepare=lambda model, v: jaxrank.add_lagrange_multiplier(v), finalize=finalize,
      train_rngs=("dropout", spec.rng_name))


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
                 rounds: int = 2, scoring_examples: int = 8,
                 chunk_size: Optional[int] = None) -> Recipe:
  """ALoRA (Liu et al., 2024): ablation scoring, pruning and reallocation of ranks.

  Every matrix starts with ``budget_rank`` live ranks out of ``rank`` slots, so the budget
  holds throughout. After a warmup of a quarter of the steps, ``rounds`` rounds (each followed
  by equal recovery) score every live rank on the first ``scoring_examples`` rows of the
  validation batch, ``chunk_size`` ranks per vmapped call (:func:`alora_chunk_size`), and move
  ranks from half the matrices to the others (with all matrices, ranks spread over every
  module are simply lost). ``alpha`` defaults to 2 × ``budget_rank`` (the initial rank).
  """
  spec = jaxrank.ALoRA(rank=rank, initial_rank=budget_rank,
                       alpha=default_alpha(alpha, budget_rank), dropout=dropout)

  def optimizer(ctx):
    steps = _steps(total_steps, ctx)
    warmup = max(1, steps // 4)
    recovery = max(1, (steps - warmup) // (rounds + 1))
    return jaxrank.alora(optax.adamw(ctx.schedule, weight_decay=weight_decay), spec, ctx.loss_fn,
                         warmup_steps=warmup, recovery_steps=recovery,
                         num_rounds=rounds, ranks_per_round=max(1, ctx.num_matrices // 2),
                         total_steps=steps,
                         validation_batch=_first(ctx.validation_batch, scoring_examples),
                         chunk_size=alora_chunk_size(chunk_size))

  return Recipe(name="alora", adapter=spec, optimizer=optimizer, separate_head=False)


RECIPES: dict[str, Callable[..., Recipe]] = {
    "frozen": frozen_recipe,
    "lora": lora_recipe,
    "sora": sora_recipe,
    "adalora": adalora_recipe,
    "salora": salora_recipe,
    "alora": alora_recipe,
}


def recipe(name: str, **options) -> Recipe:
  """The :class:`jaxrank.Recipe` of method ``name`` (a key of :data:`RECIPES`) with ``options``
  passed to its factory (e.g. ``rank``, ``budget_rank``, ``total_steps``)."""
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}.")
  return RECIPES[name](**options)
