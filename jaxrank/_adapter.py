"""Adapter math: what one adapted layer adds to its base output.

Every jaxrank adapter has the same shape of computation (SoRA eq. 6, AdaLoRA eq. 3 and the
LoRA/ALoRA/SaLoRA forms are special cases)::

    y = base(x) + scale * ((dropout(x) @ down) * gate) @ up

* ``down`` has shape ``(*in_shape, rank)`` and ``up`` has shape ``(rank, *out_shape)``, where
  the base kernel has shape ``(*in_shape, *out_shape)``. They live in the ``lora`` collection.
* ``gate`` is a vector of length ``rank`` computed from the adapter's variables in the
  ``gates`` collection (none for plain LoRA).

``W + up·down`` is never formed while training. An *adapter spec* (a frozen dataclass such as
:class:`LoRA`) holds the hyperparameters and says how to initialise the variables and how to
turn the ``gates`` variables into the gate vector. Method files (``sora.py``, ``adalora.py``,
``salora.py``, ``alora.py``) subclass :class:`LoRA`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), targets="all-linear", adapter=jaxrank.LoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> variables["lora"]["A"].shape, variables["lora"]["B"].shape
  ((3, 2), (2, 4))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
# ``rng_for(name)`` returns a fresh key from the named rng stream, or None when the caller did
# not provide that stream (evaluation).
RngFor = Callable[[str], Optional[Array]]


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Plain LoRA (Hu et al., 2021): ``y = W x + (alpha / rank) * B A dropout(x)``.

  ``A`` (``down``) starts like PyTorch/PEFT's ``kaiming_uniform(a=sqrt(5))``, i.e. uniform in
  ``±1/sqrt(fan_in)``; ``B`` (``up``) starts at zero, so an adapted model equals its base model
  at initialisation.

  Attributes:
    rank: the number of rank-one components per adapted layer (PEFT ``r``).
    alpha: the scaling numerator; the adapter output is multiplied by ``alpha / rank``
      (PEFT ``lora_alpha``).
    dropout: dropout rate on the adapter's input (PEFT ``lora_dropout``). It is applied when
      the ``apply`` call provides a ``'dropout'`` rng stream, as training steps do.
    dtype: the computation dtype of the adapter branch; ``None`` promotes the input dtype with
      ``param_dtype`` (so a bfloat16 base model gets a float32 adapter branch).
    param_dtype: dtype of the adapter variables (float32 by default).

  Example:
    >>> import jaxrank
    >>> jaxrank.LoRA(rank=8, alpha=16).scale
    2.0
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  # Names of the two factor matrices inside the ``lora`` collection.
  down_name = "A"
  up_name = "B"
  # Names of the variables ``init_gates`` returns (kept in the ``gates`` collection).
  gate_names: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"rank must be a positive int, got {self.rank!r}.")
    try:
      scale = self.scale
    except ArithmeticError:  # a subclass's own checks name its invalid field (ALoRA's ranks)
      scale = 1.0
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
        math.isfinite(self.alpha) and math.isfinite(scale) and scale != 0):
      # checked on ``scale``: a subclass may map alpha <= 0 to a non-zero scale (AdaLoRA: PEFT)
      raise ValueError(
          f"alpha must be a finite number that gives a non-zero scale (the adapter output is "
          f"scaled by {type(self).__name__}.scale, so alpha={self.alpha!r} could never change "
          f"the model); PEFT's usual choice is alpha = 2 * rank.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")

  @property
  def scale(self) -> float:
    """The constant multiplying the adapter branch."""
    return self.alpha / self.rank

  # --- initialisation -------------------------------------------------------------------
  def init_down(self, rng: Array, in_shape: tuple[int, ...]) -> Array:
    """``A`` of shape ``(*in_shape, rank)``, uniform in ``±1/sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    return jax.random.uniform(
        rng, (*in_shape, self.rank), self.param_dtype, -bound, bound
    )

  def init_up(self, rng: Array, out_shape: tuple[int, ...]) -> Array:
    """``B`` of shape ``(rank, *out_shape)``, zeros."""
    del rng
    return jnp.zeros((self.rank, *out_shape), self.param_dtype)

  def init_gates(self, rng: Array) -> dict[str, Array]:
    """The variables this adapter keeps in the ``gates`` collection (none for LoRA)."""
    del rng
    return {}

  # --- the gate ---------------------------------------------------------------------------
  def gate(self, gates: Mapping[str, Array], rng_for: RngFor) -> Optional[Array]:
    """The gate vector used in the forward pass (``None``: no gate).

    Stochastic adapters (SaLoRA) draw from ``rng_for(stream)`` when that stream is given.
    """
    del gates, rng_for
    return None

  def effective_gate(self, gates: Mapping[str, Array]) -> Optional[Array]:
    """The deterministic gate used for evaluation, merging, compaction and rank counting."""
    return self.gate(gates, lambda name: None)

  def rank_mask(self, gates: Mapping[str, Array]) -> Array:
    """A bool per rank: True where the rank is alive (its effective gate is non-zero)."""
    gate = self.effective_gate(gates)
    if gate is None:
      return jnp.ones((self.rank,), bool)
    return gate != 0

  # --- the branch ---------------------------------------------------------------------------
  def dropout_input(self, x: Array, rng_for: RngFor) -> Array:
    """Inverted dropout on the adapter input when a ``'dropout'`` rng is given."""
    if self.dropout == 0.0:
      return x
    rng = rng_for("dropout")
    if rng is None:
      return x
    keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))

  def branch(self, x: Array, layout, down: Array, up: Array, gates: Mapping[str, Array],
             rng_for: RngFor) -> Array:
    """``scale * ((dropout(x) @ down) * gate) @ up`` for one layer: the adapter's output.

    ``layout`` (a ``jaxrank._layers.Layout``) says how ``x`` contracts with ``down`` and the
    rank-space activations with ``up``; Linen's ``wrap`` and ``jaxrank.nnx.wrap`` both call
    this, so the two frameworks compute the same function.
    """
    dtype = self.compute_dtype(x)
    x = self.dropout_input(x.astype(dtype), rng_for)
    hidden = layout.project_down(x, down.astype(dtype))
    gate = self.gate(gates, rng_for)
    if gate is not None:
      hidden = hidden * gate.astype(dtype)
    return layout.project_up(hidden, up.astype(dtype)) * self.scale

  def compute_dtype(self, x: Array) -> Any:
    return self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)


def delta_kernel(
    down: Array, up: Array, gate: Optional[Array], scale: float
) -> Array:
  """``scale * down · diag(gate) · up`` with shape ``(*in_shape, *out_shape)``.

  This is the dense weight update ΔW of one layer; only export and merging form it.
  """
  if gate is not None:
    down = down * gate
  return scale * jnp.tensordot(down, up, axes=1)
