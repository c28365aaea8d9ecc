"""AdaLoRA's budget schedule (Zhang et al., 2023, eq. 12; PEFT ``RankAllocator.budget_schedule``).

The number of kept singular values falls from ``b_0`` to ``b_T`` along a cubic, with a
warmup of ``tinit`` steps at ``b_0`` and a final phase of ``tfinal`` steps at ``b_T``::

    b(t) = b_T + (b_0 − b_T) (1 − (t − t_i) / (T − t_i − t_f))³

:func:`jaxrank.adalora` reads it from a table (:func:`schedule_tables`), so the budget is a
traced value that never triggers recompilation.

Example:
  >>> from jaxrank._adalora_budget import schedule_tables
  >>> budgets, events = schedule_tables(12, 6, tinit=2, tfinal=2, total_step=10, deltaT=1)
  >>> budgets.tolist()[:6], events.astype(int).tolist()
  ([12, 12, 12, 9, 7, 6], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
"""

from __future__ import annotations

import numpy as np


def adalora_budget_schedule(
    step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int,
    total_step: int, deltaT: int,
) -> tuple[int, bool]:
  """PEFT's cubic schedule: ``(budget, mask_ind)`` at (0-based) optimizer step ``step``.

  ``b(t) = b_T + (b_0 − b_T) (1 − (t − t_i) / (T − t_i − t_f))³``, truncated with ``int()``
  as PEFT does in float64; ``b_0`` for ``t <= tinit`` and ``b_T`` for ``t > T − tfinal``.

  Example:
    >>> from jaxrank import adalora_budget_schedule
    >>> [adalora_budget_schedule(t, init_budget=12, target_budget=6, tinit=2, tfinal=2, total_step=10,
    ...                  deltaT=1)[0] for t in range(11)]
    [12, 12, 12, 9, 7, 6, 6, 6, 6, 6, 6]
  """
  if step <= tinit:
    return init_budget, False
  if step > total_step - tfinal:
    return target_budget, True
  mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
  budget = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
  return budget, step % deltaT == 0


def schedule_tables(init_budget, target_budget, tinit, tfinal, total_step, deltaT):
  """Per step ``0..total_step``: the budget and whether a new mask is computed (numpy)."""
  final = total_step - tfinal
  budgets, events = [], []
  for step in range(total_step + 1):
    budget, mask_ind = adalora_budget_schedule(
        step, init_budget=init_budget, target_budget=target_budget, tinit=tinit,
        tfinal=tfinal, total_step=total_step, deltaT=deltaT)
    budgets.append(budget)
    # After `final` the frozen mask is reapplied instead (PEFT mask_using_rank_pattern).
    events.append((mask_ind and step < final) or step == final)
  return np.asarray(budgets, np.int32), np.asarray(events, bool)
