"""Global rank budgets that work with a *traced* budget (no recompilation as it shrinks).

``lax.top_k`` needs a static ``k``; a budget injected with ``optax.inject_hyperparams`` or
computed from the step count is traced, so the threshold is read off a sort instead
(PEFT's ``kthvalue`` rule: keep the scores strictly above the ``(n - b)``-th smallest).

Example:
  >>> import jax.numpy as jnp, jaxrank
  >>> masks = jaxrank.top_budget_masks([jnp.array([0.1, 0.9]), jnp.array([0.5])], 2)
  >>> [m.tolist() for m in masks]
  [[False, True], [True]]
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxrank import sharding


def budget_threshold(scores: jax.Array, budget) -> jax.Array:
  """The value above which the ``budget`` largest entries of the flat ``scores`` lie.

  Returns ``-inf`` when ``budget >= scores.size`` (keep everything) and ``+inf`` when
  ``budget <= 0`` (keep nothing).
  """
  n = scores.size
  budget = jnp.asarray(budget, jnp.int32)
  ascending = jnp.sort(sharding.replicated(scores.reshape(-1)))
  index = jnp.clip(n - budget - 1, 0, n - 1)
  threshold = ascending[index]
  threshold = jnp.where(budget >= n, -jnp.inf, threshold)
  return jnp.where(budget <= 0, jnp.inf, threshold)


def top_budget_masks(scores: Sequence[jax.Array], budget) -> list[jax.Array]:
  """A bool mask per score array: True for the ``budget`` globally highest scores.

  Ties at the threshold are all dropped, as PEFT's ``masked_fill_(score <= threshold, 0)``
  does, so fewer than ``budget`` entries may survive when scores tie.
  """
  flat = sharding.replicated(jnp.concatenate([jnp.ravel(s) for s in scores]))
  threshold = budget_threshold(flat, budget)
  return [s > threshold for s in scores]


def exact_top_masks(scores: Sequence[jax.Array], budget, *, positive: bool = False) -> list:
  """A bool mask per array: the ``budget`` largest scores over all arrays, exactly.

  Unlike :func:`jaxrank.top_budget_masks` (PEFT's rule, ties dropped), ties are broken by
  position, so exactly ``budget`` entries are kept (with ``positive``, only scores > 0).
  Works under ``jit`` with a traced budget.

  >>> [m.tolist() for m in exact_top_masks([jnp.array([1.0, 1.0]), jnp.array([1.0])], 2)]
  [[True, True], [False]]
  """
  flat = sharding.replicated(jnp.concatenate([jnp.ravel(s) for s in scores]))
  order = jnp.argsort(-flat, stable=True)
  rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  keep = rank < budget
  if positive:
    keep = jnp.logical_and(keep, flat > 0)
  out, start = [], 0
  for s in scores:
    out.append(keep[start:start + s.size].reshape(s.shape))
    start += s.size
  return out
