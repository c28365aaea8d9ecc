"""AdaLoRA's adapter spec (Zhang et al., 2023, eq. 3): ``Δ = P Λ Q`` in jaxrank's layout.

``down`` is ``Q^T`` with shape ``(*in_shape, r)`` (``lora/.../Q``, PEFT ``lora_A`` transposed),
``up`` is ``P^T`` with shape ``(r, *out_shape)`` (``lora/.../P``, PEFT ``lora_B`` transposed) and
the singular values ``Λ`` are the gate ``gates/.../singular_values`` (PEFT ``lora_E``). The
transform that allocates the budget is :func:`jaxrank.adalora` (``_adalora.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _adapter

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdaLoRA(_adapter.LoRA):
  """SVD-form adapter ``Δ = P Λ Q`` (AdaLoRA eq. 3), initialised as PEFT does.

  ``P`` and ``Q`` start Gaussian with standard deviation ``init_std`` (0.02, PEFT) and ``Λ``
  at zero, so the adapted model equals its base model at initialisation. ``init_std=None``
  (jaxrank's option, the recipe's default) draws them with std ``1/sqrt(fan)``: every singular
  vector starts at unit norm (``E||P_*i||² = 1``), where ``R(P, Q)`` (eq. 4) is small and
  ``Λ``'s gradient ``P_*iᵀ ∇_Δ Q_i*`` is ``O(||∇_Δ||)``.

  Scale: PEFT's ``SVDLinear`` multiplies the branch by ``lora_alpha / (ranknum + 1e-5)`` with
  ``ranknum = init_r`` that is never decreased when triplets are masked (and is restored on
  load), and uses ``r`` in place of ``lora_alpha`` when ``lora_alpha <= 0``. :attr:`scale`
  reproduces that exactly: ``alpha / (rank + 1e-5)`` (``rank / (rank + 1e-5)`` for
  ``alpha <= 0``), fixed for the whole run.

  Attributes:
    rank: ``init_r``, the number of triplets per adapted layer (PEFT default 12).
    alpha: PEFT ``lora_alpha`` (default 8, PEFT's).
    init_std: standard deviation of the Gaussian init of ``P`` and ``Q`` (0.02, PEFT's);
      ``None``: ``1/sqrt(fan)`` (unit-norm singular vectors).

  Example:
    >>> from jaxrank import AdaLoRA
    >>> spec = AdaLoRA(rank=12, alpha=8.0)
    >>> round(spec.scale, 6), spec.down_name, spec.up_name, spec.gate_names
    (0.666666, 'Q', 'P', ('singular_values',))
  """

  rank: int = 12
  alpha: float = 8.0
  init_std: Optional[float] = 0.02

  down_name = "Q"
  up_name = "P"
  gate_names: ClassVar[tuple[str, ...]] = ("singular_values",)

  @property
  def scale(self) -> float:
    numerator = self.alpha if self.alpha > 0 else float(self.rank)
    return numerator / (self.rank + 1e-5)

  def _std(self, fan: int) -> float:
    return float(fan) ** -0.5 if self.init_std is None else self.init_std

  def init_down(self, rng: Array, in_shape: tuple[int, ...]) -> Array:
    """``Q^T`` of shape ``(*in_shape, rank)``, Gaussian, std ``init_std`` (or 1/sqrt(fan_in))."""
    std = self._std(int(np.prod(in_shape)))
    return std * jax.random.normal(rng, (*in_shape, self.rank), self.param_dtype)

  def init_up(self, rng: Array, out_shape: tuple[int, ...]) -> Array:
    """``P^T`` of shape ``(rank, *out_shape)``, Gaussian, std ``init_std`` (or 1/sqrt(fan_out))."""
    std = self._std(int(np.prod(out_shape)))
    return std * jax.random.normal(rng, (self.rank, *out_shape), self.param_dtype)

  def init_gates(self, rng: Array) -> dict[str, Array]:
    """``Λ`` (the singular values), zeros of shape ``(rank,)``."""
    del rng
    return {"singular_values": jnp.zeros((self.rank,), self.param_dtype)}

  def gate(self, gates: Mapping[str, Array], rng_for) -> Array:
    del rng_for
    return gates["singular_values"]
