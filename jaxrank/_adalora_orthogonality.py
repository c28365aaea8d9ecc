"""AdaLoRA's orthogonality term (Zhang et al., 2023, eq. 4) applied inside :func:`jaxrank.adalora`.

The paper trains ``C(P, Λ, Q) + γ Σ_k R(P_k, Q_k)`` with

    R(P, Q) = ||PᵀP − I||²_F + ||QQᵀ − I||²_F                                          (eq. 4)

(:func:`jaxrank.orthogonality_penalty` is that term for the loss). ``adalora(orth_weight=γ)``
adds its gradient to the gradient it receives instead, before the inner optimizer and before
the sensitivity of eq. 8 (PEFT's sensitivity also sees the regulariser, which it adds to the
loss). Two forms of the added gradient:

* ``orth_normalize=False``: ``∇C + γ ∇R``, the paper's gradient of ``C + γ R`` (§3.2); the
  balance between task and orthogonality depends on the scale of the loss;
* ``orth_normalize=True`` (jaxrank's engineering, the default): ``∇C + γ · ρ̄_t · ∇R`` with
  ``ρ̄_t`` the bias-corrected EMA (factor ``orth_beta``) of ``RMS(∇C)`` over every ``P``, ``Q``
  entry. Scaling the loss ``C → cC`` scales ``∇C`` and ``ρ̄`` alike, and Adam removes the
  common factor, so one ``γ`` (1 in the recipe) holds whatever the loss scale.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxrank import _adalora_orthogonality as orth
  >>> factors = {"": (jnp.eye(3)[:, :2], jnp.eye(2, 4), 0)}  # orthonormal: R = 0
  >>> float(orth.penalty(factors, "paper")), float(orth.penalty(factors, "peft"))
  (0.0, 0.0)
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxrank import _regularizers
from jaxrank import _tree

Array = jax.Array


def is_off(orth_weight) -> bool:
  """True for a Python ``γ = 0`` (the term is not even traced); a traced γ is always on."""
  return isinstance(orth_weight, (int, float)) and orth_weight == 0


def penalty(factors: Mapping[str, tuple], form: str) -> Array:
  """``Σ_k R(P_k, Q_k)`` (eq. 4, ``form="paper"``) or PEFT's unsquared mean (``"peft"``).

  ``factors``: per layer path ``(down, up, stacked_axes)``; the Gram deviations are
  :func:`jaxrank.orthogonality_penalty`'s, so ``γ ∇`` of this equals that penalty's gradient.
  """
  total, matrices = jnp.zeros((), jnp.float32), 0
  for down, up, lead in factors.values():
    q_dev, p_dev = _regularizers._gram_deviations(_tree.AdapterLayer(down, up, {}, lead))
    for dev in (q_dev, p_dev):  # ||QQᵀ − I||_F, ||PᵀP − I||_F per stacked copy
      total = total + (jnp.sum(dev**2) if form == "paper" else jnp.sum(dev))
      matrices += dev.size
  return total if form == "paper" else total / matrices


def add_gradient(grads: Mapping[tuple, Array], leaves: Mapping[tuple, Array], layers,
                 grad_scale: Array, count: Array, *, weight, form: str, normalize: bool,
                 beta, axis_name=None) -> tuple[dict, Array]:
  """The task gradient with ``γ ρ̄_t ∇R`` (or ``γ ∇R``) added on every ``P``, ``Q`` leaf.

  Args:
    grads, leaves: the gradient and the parameters, by leaf key (``_tree.leaves_by_key``).
    layers: per layer path, an object with ``down``, ``up`` (leaf keys) and ``stacked_axes``.
    grad_scale: the running EMA ``ρ̄`` (uncorrected) before this step.
    count: the optimizer steps already taken (for the bias correction).
    weight, form, normalize, beta: ``orth_weight``, ``orth_form``, ``orth_normalize``,
      ``orth_beta`` of :func:`jaxrank.adalora`.
    axis_name: replicas average ``RMS(∇C)`` (``lax.pmean``) so they all add the same term.

  Returns:
    ``(new gradient leaves for the factors, new ρ̄)``.
  """
  keys = [k for layer in layers.values() for k in (layer.down, layer.up)]
  square_sum = sum(jnp.sum(jnp.square(grads[k].astype(jnp.float32))) for k in keys)
  rms = jnp.sqrt(square_sum / sum(grads[k].size for k in keys))  # RMS(∇C)
  if axis_name is not None:
    rms = jax.lax.pmean(rms, axis_name)
  b = jnp.asarray(beta, jnp.float32)
  new_scale = b * grad_scale + (1 - b) * rms  # EMA of RMS(∇C)
  corrected = new_scale / (1 - b ** (count.astype(jnp.float32) + 1))  # ρ̄_t, bias-corrected
  gamma = jnp.asarray(weight, jnp.float32) * (corrected if normalize else 1.0)
  leads = {p: l.stacked_axes for p, l in layers.items()}
  grad_r = jax.grad(lambda f: penalty({p: (*f[p], leads[p]) for p in f}, form))(
      {p: (leaves[l.down], leaves[l.up]) for p, l in layers.items()})  # ∇R
  out = {}
  for path, layer in layers.items():
    for key, g in zip((layer.down, layer.up), grad_r[path]):
      out[key] = (grads[key] + gamma * g).astype(grads[key].dtype)  # ∇C + γ ρ̄ ∇R
  return out, new_scale
