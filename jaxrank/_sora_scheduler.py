"""SoRA's sparsifying scheduler (Ding et al., 2023, Algorithm 1): re-train with ever larger λ.

SoRA trades sparsity against accuracy by training in phases: a (possibly dense, ``λ = 0``)
first phase, then phases of increasing ``λ``, each continuing from the last, each stored as a
checkpoint. The user keeps the sparsest checkpoint whose metrics are still acceptable. The
official code builds the ``λ`` list by :func:`sora_lambda_values`; :func:`sora_gate_sparsity`
is the fraction of gate entries the prox has zeroed.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(2), adapter=jaxrank.SoRA(rank=4))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> def train_phase(variables, lam, phase):  # stands for a real training phase
  ...   return {**variables, "gates": {"g": jaxrank.soft_threshold(jnp.arange(4.0), lam)}}
  >>> reports = jaxrank.sparsifying_scheduler(
  ...     model, variables, jaxrank.sora_lambda_values(0.0, 2.0, 3), train_phase,
  ...     train_metric=lambda v: 0.0, eval_metric=lambda v: 0.0)
  >>> [(r.lam, r.sparsity, r.rank_pattern) for r in reports]
  [(0.0, 0.25, {'': 3}), (1.0, 0.5, {'': 2}), (2.0, 0.75, {'': 1})]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from jaxrank import _tree
from jaxrank import _variables


def sora_gate_sparsity(model, variables) -> float:
  """The fraction of gate entries that are exactly zero, over all SoRA layers."""
  total = sum(int(np.size(m)) for m in _tree.rank_masks(model, variables).values())
  return 1.0 - _tree.live_rank_total(model, variables) / total


def sora_lambda_values(start: float, stop: float, num: int, kind: str = "linear") -> list[float]:
  """The official ξ list of the sparsifying scheduler (``SparseAdamW._build_lambda_list``).

  ``linear``: ``linspace(start, stop, num)``; ``log_linear``: ``log(linspace(e^start,
  e^stop, num))``; ``exp_linear``: ``exp(linspace(log start, log stop, num))`` (start > 0).

  >>> sora_lambda_values(0.0, 3.0, 4)
  [0.0, 1.0, 2.0, 3.0]
  """
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num!r}.")
  if kind == "linear":
    values = np.linspace(start, stop, num)
  elif kind == "log_linear":
    values = np.log(np.linspace(np.exp(start), np.exp(stop), num))
  elif kind == "exp_linear":
    if start <= 0 or stop <= 0:
      raise ValueError("kind='exp_linear' needs start > 0 and stop > 0.")
    values = np.exp(np.linspace(np.log(start), np.log(stop), num))
  else:
    raise ValueError(f"kind must be 'linear', 'log_linear' or 'exp_linear', got {kind!r}.")
  return [float(v) for v in values]


@dataclasses.dataclass(frozen=True)
class SoraPhaseReport:
  """One phase of the sparsifying scheduler: its λ, the sparsity reached and two metrics."""

  phase: int
  lam: float
  sparsity: float
  rank_pattern: dict
  train_metric: float
  eval_metric: float
  # the checkpoint after this phase (Algorithm 1's M'.add(M))
  variables: Any = dataclasses.field(repr=False, compare=False)


def sparsifying_scheduler(
    model,
    variables,
    lams: Sequence[float],
    train_phase: Callable[[Any, float, int], Any],
    *,
    train_metric: Callable[[Any], Any],
    eval_metric: Callable[[Any], Any],
    on_phase: Optional[Callable[[SoraPhaseReport], None]] = None,
) -> list[SoraPhaseReport]:
  """SoRA's sparsifying scheduler (Algorithm 1): train, then re-train with ever larger λ.

  For each ``lam`` in ``lams`` (the first may be 0 for a dense phase), in order::

      variables = train_phase(variables, lam, phase)
      report sparsity, rank_pattern, train_metric(variables), eval_metric(variables)

  Each report keeps that phase's variables (the stored checkpoints of Algorithm 1), so the
  user can pick the sparsest model whose metrics are still acceptable.

  Learning-rate schedules: ``train_phase`` builds its own optimizer (e.g.
  ``sora_optimizer(optax.adamw(schedule), lam, gate_schedule)``) and its own state, so every
  phase starts its learning-rate schedule (warmup/decay) and optimizer moments afresh. The
  official ``run_glue.py`` instead reuses the first phase's optimizer and LR scheduler objects;
  those have decayed to 0 by the end of phase 1, so its later phases only apply the constant
  threshold (methods.md §2.4). To reproduce that, keep the optimizer state in a closure and
  continue it inside ``train_phase``.

  Args:
    model: the wrapped SoRA model (used to count live ranks).
    variables: its starting variables.
    lams: λ per phase, e.g. :func:`sora_lambda_values` ``(0.0, 7e-4, 7)``.
    train_phase: ``(variables, lam, phase_index) -> variables`` trains one phase.
    train_metric: ``variables -> scalar`` (the official code's "memorization" numerator).
    eval_metric: ``variables -> scalar`` (the "generalization" numerator).
    on_phase: called with each report as soon as it is ready (logging).

  Returns:
    One :class:`SoraPhaseReport` per phase.
  """
  lams = [float(l) for l in lams]
  if not lams:
    raise ValueError("lams must hold at least one λ (one phase).")
  if any(l < 0 for l in lams):
    raise ValueError(f"every λ must be non-negative, got {lams}.")
  reports = []
  for phase, lam in enumerate(lams):
    variables = train_phase(variables, lam, phase)
    report = SoraPhaseReport(
        phase=phase,
        lam=lam,
        sparsity=sora_gate_sparsity(model, variables),
        rank_pattern=_variables.rank_pattern(model, variables),
        train_metric=float(train_metric(variables)),
        eval_metric=float(eval_metric(variables)),
        variables=variables,
    )
    reports.append(report)
    if on_phase is not None:
      on_phase(report)
  return reports
