"""Regularisers shared by the SVD-form and gated adapters.

Orthogonality penalty (AdaLoRA eq. 4, SaLoRA eq. 9) on ``P`` (columns) and ``Q`` (rows).
In jaxrank's layout ``down`` is ``Q^T`` with shape ``(*in_shape, r)`` and ``up`` is ``P^T`` with
shape ``(r, *out_shape)``, so ``Q Q^T = down^T down`` and ``P^T P = up up^T`` (both ``r x r``).

* ``form="paper"`` (default): ``R(P, Q) = Σ_layers ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``.
* ``form="peft"``: PEFT's AdaLoRA code, ``mean over matrices of ||·||_F`` (not squared).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.LoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> float(jaxrank.orthogonality_penalty(model, variables)) > 0
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrank import _tree
from jaxrank import sharding


def _gram_deviations(layer: _tree.AdapterLayer) -> tuple[jax.Array, jax.Array]:
  """``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` per stacked copy (shape ``stack``)."""
  lead = layer.stacked_axes
  rank = layer.down.shape[-1]
  # Factors are small; replicate them so the contraction over a sharded axis is unambiguous.
  down = sharding.replicated(layer.down).reshape(layer.down.shape[:lead] + (-1, rank))
  up = sharding.replicated(layer.up).reshape(layer.up.shape[:lead] + (rank, -1))
  eye = jnp.eye(rank, dtype=jnp.float32)
  q_gram = jnp.einsum("...ir,...is->...rs", down, down)  # Q Q^T
  p_gram = jnp.einsum("...ro,...so->...rs", up, up)  # P^T P
  norm = lambda m: jnp.sqrt(jnp.sum(jnp.square(m - eye), axis=(-2, -1)))
  return norm(q_gram), norm(p_gram)


def orthogonality_penalty(model, variables, *, form: str = "paper") -> jax.Array:
  """The orthogonality penalty over every adapted layer (see the module docstring)."""
  if form not in ("paper", "peft"):
    raise ValueError(f"form must be 'paper' or 'peft', got {form!r}.")
  total = jnp.zeros((), jnp.float32)
  matrices = 0
  for layer in _tree.adapter_layers(model, variables).values():
    q_dev, p_dev = _gram_deviations(layer)
    if form == "paper":
      total = total + jnp.sum(q_dev**2) + jnp.sum(p_dev**2)
    else:
      total = total + jnp.sum(q_dev) + jnp.sum(p_dev)
      matrices += 2 * q_dev.size
  return total if form == "paper" else total / matrices
