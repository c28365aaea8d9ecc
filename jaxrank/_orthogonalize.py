"""The SVD form of an adapter's live ranks, and the optimizer restart that goes with it.

jaxrank's engineering, not in the papers. LoRA's doublets ``(a_i, b_i)`` are not orthogonal:
after training, one direction of the update is often split over several ranks, and every rank
of the split then looks important to a score that removes or keeps one rank at a time (SoRA's
``|g_i| ‖a_i‖ ‖b_i‖``, ALoRA's ablations). Rewriting the live ranks of each matrix in the SVD
form of its update leaves ``ΔW`` unchanged and makes rank ``j`` carry singular triplet ``j``,
so a rank-at-a-time score measures one direction.

With ``A = Q_a R_a`` and ``Bᵀ = Q_b R_b`` (thin QR) the core ``C = R_a diag(g) R_bᵀ = U diag(s) Vᵀ``
has the singular values of ``A diag(g) B``; the ``L`` live slots (``g ≠ 0``, in order) receive
the ``L`` leading triplets; dead slots are unchanged.

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from jaxrank._orthogonalize import svd_form
  >>> a = jnp.array([[1., 1., 0.], [0., 1., 0.]])           # in 2, rank 3
  >>> b = jnp.array([[1., 0.], [1., 0.], [5., 5.]])          # rank 3, out 2
  >>> g = jnp.array([1., 1., 0.])   # slot 2 is dead; ΔW = [[2, 0], [1, 0]] has rank 1
  >>> a2, b2, g2 = svd_form(a, b, g, split="factors")
  >>> bool(np.allclose((a2 * g2) @ b2, (a * g) @ b, atol=1e-5)), g2.tolist()
  (True, [1.0, 1.0, 0.0])
  >>> [round(float(x), 3) for x in np.linalg.norm(a2, axis=0) * np.linalg.norm(b2, axis=1)][:2]
  [2.236, 0.0]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
SPLITS = ("factors", "gate", "values")


def _svd_form_2d(down: Array, up: Array, gate: Array, split: str):
  f32 = jnp.float32
  (d, r), k = down.shape, up.shape[1]
  # a rank above the layer's sides: zero rows/columns up to r, so both QRs are d' × r, r × r
  # (the padded rows of ΔW are zero, so dropping them afterwards is exact)
  down_p = jnp.pad(down.astype(f32), ((0, max(r - d, 0)), (0, 0)))
  up_p = jnp.pad(up.astype(f32), ((0, 0), (0, max(r - k, 0))))
  qa, ra = jnp.linalg.qr(down_p)  # d' × r, r × r
  qb, rb = jnp.linalg.qr(up_p.T)  # k' × r, r × r
  live = gate != 0
  g = gate.astype(f32) if split in ("gate", "values") else live.astype(f32)
  u, s, vt = jnp.linalg.svd((ra * g) @ rb.T)  # core R_a diag(g) R_bᵀ = U diag(s) Vᵀ
  comp = jnp.where(live, jnp.cumsum(live.astype(jnp.int32)) - 1, 0)  # j-th live slot ← s_j
  s = jnp.maximum(s, 1e-30)[comp]
  # the shares of s_j in a_j and b_j: s = a·g·b (gate), s = a·b with g = 1 (factors), s = g
  if split == "factors":  # ‖a_j‖ never below the live columns' mean norm: a weak rank keeps
    norms = jnp.linalg.norm(down_p, axis=0)  # a LoRA-like A and can grow again
    floor = jnp.sum(jnp.where(live, norms, 0.0)) / jnp.maximum(jnp.sum(live), 1)
    root_a = jnp.maximum(jnp.sqrt(s), floor)
    root_b = s / root_a
  else:
    root_a = root_b = {"gate": jnp.cbrt(s), "values": jnp.ones_like(s)}[split]
  new_down = jnp.where(live[None, :], (qa @ u)[:d, comp] * root_a, down.astype(f32))
  new_up = jnp.where(live[:, None], root_b[:, None] * (vt @ qb.T)[comp, :k], up.astype(f32))
  new_gate = {"gate": jnp.where(live, root_a, 0.0), "factors": gate.astype(f32),
              "values": jnp.where(live, s, 0.0)}[split]
  return new_down.astype(down.dtype), new_up.astype(up.dtype), new_gate.astype(gate.dtype)


def svd_form(down: Array, up: Array, gate: Array, *, split: str):
  """``(A, B, g)`` rewritten so the live ranks are the SVD of ``A diag(g) B``; ``ΔW`` unchanged.

  Shapes: ``A (*stack, *in, r)``, ``B (*stack, r, *out)``, ``g (*stack, r)``; stacked copies
  (``nn.scan``) are rewritten one by one. ``split="gate"`` (SoRA, whose gate is trained):
  ``a_j = u_j s_j^{1/3}``, ``g_j = s_j^{1/3}``, ``b_j = s_j^{1/3} v_jᵀ``, so ``|g_j|‖a_j‖‖b_j‖ = s_j``.
  ``split="factors"`` (a fixed 0/1 gate such as ALoRA's mask, read as ``g ≠ 0``):
  ``a_j = u_j c_j``, ``b_j = (s_j / c_j) v_jᵀ`` with ``c_j = max(s_j^{1/2}, mean live ‖a‖)``
  (a rank with ``s_j ≈ 0`` keeps an ``A`` of LoRA's scale and ``B ≈ 0``, so it can still
  learn), and ``g`` unchanged. ``split="values"``
  (AdaLoRA's ``Q Λ P``): unit singular vectors and ``λ_j = s_j``. jit-safe.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  stack, r = gate.shape[:-1], gate.shape[-1]
  if down.shape[:len(stack)] != stack or down.shape[-1] != r or up.shape[len(stack)] != r:
    raise ValueError(f"factor shapes {down.shape}, {up.shape} do not match gate {gate.shape}.")
  n = math.prod(stack)
  a2 = down.reshape((n, -1, r))
  b2 = up.reshape((n, r, -1))
  new = jax.vmap(lambda a, b, g: _svd_form_2d(a, b, g, split))(a2, b2, gate.reshape((n, r)))
  return new[0].reshape(down.shape), new[1].reshape(up.shape), new[2].reshape(gate.shape)


def zero_first_moments(state, when=True):
  """The optimizer ``state`` after a rotation of the parameters: every Adam first moment zeroed
  where ``when`` (a traced bool is fine), everything else kept: second moments, counts,
  learning-rate schedules, injected hyperparameters.

  Stale momentum would push along the old basis; the kept second moments give the next
  steps a magnitude-aware size (``(1 − β₁) g / √v̂``, a tenth of a step at first). A full
  reset would not: Adam's first step is ``± lr`` per coordinate whatever the gradient's size,
  so rounding-level gradients (which differ between data-parallel layouts) would move a full
  step, and the learning-rate schedule would restart from its warmup.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from jaxrank._orthogonalize import zero_first_moments
    >>> tx = optax.adamw(optax.linear_schedule(1.0, 0.0, 10))
    >>> p = {"w": jnp.ones(2)}
    >>> s = tx.init(p)
    >>> for _ in range(4):
    ...   _, s = tx.update(p, s, p)
    >>> r = zero_first_moments(s)
    >>> float(r[0].mu["w"][0]), float(r[0].nu["w"][0]) > 0, int(r[0].count), int(r[-1].count)
    (0.0, True, 4, 4)
  """
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  zero = lambda m: jnp.where(when, jnp.zeros_like(m), m)
  return jax.tree.map(lambda x: x._replace(mu=jax.tree.map(zero, x.mu)) if is_adam(x) else x,
                      state, is_leaf=is_adam)
