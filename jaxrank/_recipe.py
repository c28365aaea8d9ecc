"""The recipe plug-in: what a rank method hands the training loop.

A :class:`Recipe` is everything a loop needs to train one method: the adapter spec given to
:func:`jaxrank.wrap`, a builder of the method's optax transform (called with a
:class:`RecipeContext` once the model and schedule exist), an extra loss term, optional
preparation and finalisation of the variables, a way to read the learned rank pattern and the
rng streams of a training step. :func:`lora` and :func:`frozen` are the two reference recipes;
:mod:`jaxrank.recipes` builds every method's recipe from the library's defaults.

Example:
  >>> import optax
  >>> from jaxrank import _recipe
  >>> r = _recipe.lora(rank=4)
  >>> r.name, r.adapter.rank, r.adapter.alpha
  ('lora', 4, 8.0)
  >>> _recipe.frozen().adapter is None
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import optax

from jaxrank import _adapter

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RecipeContext:
  """What a recipe's optimizer builder may use.

  Attributes:
    model: the wrapped model.
    total_steps: optimizer steps of the run.
    learning_rate: the peak learning rate (the schedule is ``schedule``).
    schedule: the learning-rate schedule (linear warmup, then linear decay).
    loss_fn: ``loss_fn(trainable, batch) -> scalar``, the deterministic task loss with the
      frozen variables closed over (for methods that score ranks by forward passes, e.g.
      ALoRA; inside the step prefer the penalty hook). The head inside ``trainable`` may be a
      masked node (see :func:`jaxrank._heads.with_head`); then the initial head is used.
    validation_batch: one fixed batch of the validation split (ALoRA's scoring batch).
    num_matrices: the number of adapted matrices.
  """

  model: Any
  total_steps: int
  learning_rate: float
  schedule: optax.Schedule
  loss_fn: Callable
  validation_batch: Optional[Batch] = None
  num_matrices: int = 0


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A rank method as the training loop sees it.

  Attributes:
    name: shown in logs and tables.
    adapter: the adapter spec given to :func:`jaxrank.wrap` (``None``: no adapters, only the
      head trains; the frozen-model baseline).
    optimizer: ``optimizer(ctx) -> optax.GradientTransformation``. With ``separate_head``
      (default) it sees ``{'lora', 'gates'}`` and the head gets its own AdamW
      (:func:`jaxrank._heads.with_head`); otherwise it updates the whole trainable tree, head
      included (use that when the transform needs the live head, e.g. ALoRA's scoring
      ``ctx.loss_fn``).
    penalty: ``penalty(model, variables) -> scalar`` added to the task loss (e.g. AdaLoRA's
      orthogonality term, SaLoRA's Lagrangian), or ``None``.
    prepare: ``prepare(model, variables) -> variables`` after ``init`` (e.g. adding SaLoRA's
      Lagrange multiplier), or ``None``.
    finalize: ``finalize(model, variables, opt_state) -> variables`` after training (e.g.
      hardening SaLoRA's gates) before evaluation and export, or ``None``.
    rank_pattern: ``rank_pattern(model, variables, opt_state) -> {path: rank}``; by default
      :func:`jaxrank.rank_pattern` (the live ranks of the deterministic gates).
    train_rngs: rng streams passed to ``apply`` in training steps (``'dropout'`` always).
    targets: which layers get adapters (``None``: the caller's default).
    separate_head: see ``optimizer``.
  """

  name: str
  adapter: Optional[_adapter.LoRA]
  optimizer: Callable[[RecipeContext], optax.GradientTransformation]
  penalty: Optional[Callable[[Any, Any], jax.Array]] = None
  prepare: Optional[Callable[[Any, Any], Any]] = None
  finalize: Optional[Callable[[Any, Any, Any], Any]] = None
  rank_pattern: Optional[Callable[[Any, Any, Any], dict]] = None
  train_rngs: tuple[str, ...] = ("dropout",)
  targets: Any = None
  separate_head: bool = True


def default_alpha(alpha: Optional[float], rank: int) -> float:
  """``alpha``, or ``2 * rank`` when it is ``None`` (every recipe's default)."""
  return float(2 * rank if alpha is None else alpha)


def lora(rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
         weight_decay: float = 0.0) -> Recipe:
  """Plain LoRA (Hu et al., 2021) with AdamW on the factors; ``alpha`` defaults to ``2·rank``."""
  adapter = _adapter.LoRA(rank=rank, alpha=default_alpha(alpha, rank), dropout=dropout)
  return Recipe(
      name="lora", adapter=adapter,
      optimizer=lambda ctx: optax.adamw(ctx.schedule, weight_decay=weight_decay))


def frozen() -> Recipe:
  """The frozen-model baseline: no adapters, only the task head trains."""
  return Recipe(name="frozen", adapter=None, optimizer=lambda ctx: optax.identity())
