"""AdaLoRA's triplet importance (Zhang et al., 2023, §3.2, eq. 7–11), used by :func:`jaxrank.adalora`.

``importance="sensitivity"`` (the paper's choice, the default): per entry ``w`` of ``P``, ``Λ``,
``Q`` with gradient ``g``, after the update (PEFT's order)

    I = |w · g|                                                                        (eq. 8)
    Ī ← β1 Ī + (1 − β1) I                                                              (eq. 9)
    Ū ← β2 Ū + (1 − β2) |I − Ī|        (with the new Ī, as PEFT)                        (eq. 10)
    s = Ī · Ū                                                                          (eq. 11)
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)                                      (eq. 7)

``importance="magnitude"`` (the paper's first option, §3.2):
``S_i = |λ_i| · ||P_*i|| · ||Q_i*||``, the Frobenius norm of triplet ``i``'s rank-one term
(``|λ_i|`` when ``P``, ``Q`` are orthonormal), i.e. a global singular-value cut. The norms are
jaxrank's addition, so the score stays the term's size when ``P``, ``Q`` drift from unit norm.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxrank import _adalora_importance as imp
  >>> new = {"down": jnp.ones((3, 2)), "up": 2 * jnp.ones((2, 4)), "gate": jnp.array([1., -.5])}
  >>> [round(v, 3) for v in imp.magnitude_score(new, 0).tolist()]   # |λ| · sqrt(3) · 4
  [6.928, 3.464]
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
PARTS = ("down", "up", "gate")
IMPORTANCES = ("sensitivity", "magnitude")


def check(importance: str) -> None:
  if importance not in IMPORTANCES:
    raise ValueError(f"importance must be 'sensitivity' or 'magnitude', got {importance!r}.")


def smoothed(sensitivity: Array, uncertainty: Array, instant: Array, beta1, beta2):
  """One EMA step: the new ``(Ī, Ū)`` from the old ones and ``I`` (eq. 9, 10)."""
  new_sens = beta1 * sensitivity + (1 - beta1) * instant  # eq. 9
  new_unc = beta2 * uncertainty + (1 - beta2) * jnp.abs(instant - new_sens)  # eq. 10
  return new_sens, new_unc


def sensitivity_score(sensitivity: Mapping[str, Array], uncertainty: Mapping[str, Array],
                      stacked_axes: int) -> Array:
  """Eq. 7 with ``s = Ī·Ū`` (eq. 11): shape ``(*stack, r)``."""
  s = {part: sensitivity[part] * uncertainty[part] for part in PARTS}  # eq. 11
  down_axes = tuple(range(stacked_axes, s["down"].ndim - 1))  # over in_shape
  up_axes = tuple(range(stacked_axes + 1, s["up"].ndim))  # over out_shape
  return s["gate"] + jnp.mean(s["down"], axis=down_axes) + jnp.mean(s["up"], axis=up_axes)


def magnitude_score(new: Mapping[str, Array], stacked_axes: int) -> Array:
  """``|λ_i| · ||P_*i|| · ||Q_i*||`` from the post-update ``{'down','up','gate'}`` values."""
  norm = lambda x, axes: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes))
  q_norm = norm(new["down"], tuple(range(stacked_axes, new["down"].ndim - 1)))
  p_norm = norm(new["up"], tuple(range(stacked_axes + 1, new["up"].ndim)))
  return jnp.abs(new["gate"].astype(jnp.float32)) * q_norm * p_norm
