"""SoRA at a rank budget: the proximal gate step under a shrinking global budget ``b(t)``.

SoRA (Ding et al., 2023) reaches sparsity with the proximal step of eq. 10-11 and a
*sparsifying scheduler* (Algorithm 1) that raises λ phase by phase until the sparsity is
acceptable; the run ends wherever λ leaves it. :func:`sora_budget` instead makes the budget
the schedule (jaxrank's engineering, not the paper): the number of live ranks follows the
cubic :func:`sora_budget_schedule` from capacity at ``t_init`` to the budget ``b`` at
``t_final`` (AdaLoRA's eq. 9 shape), the live ranks take the paper's soft-threshold, and
after ``t_final`` the pattern is frozen while the survivors fine-tune (recovery). The run
therefore ends at exactly ``b`` live ranks by itself, inside the jitted step.

Two further pieces of jaxrank's engineering, each with the paper's form as an option:

* ``normalize=True``: the threshold is taken relative to the task loss and in Adam's metric,
  ``ξ_i = η_t λ L̄_0 / √v̂_i``, so λ keeps its meaning when the loss is scaled
  (``normalize=False`` is the paper's ``ξ = η_t λ``).
* ``orthogonalize_every=K``: every ``K`` pruning steps each layer is rewritten in the SVD form
  of its core (:func:`sora_orthogonalize`, ``ΔW`` unchanged), so a rank's magnitude score is
  its singular value (``None``: the raw factors' scores).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.SoRA(rank=4))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> _, trainable = jaxrank.split_variables(variables)
  >>> tx = jaxrank.sora_budget(optax.adam(1e-2), 1e-2, budget=1, t_init=0, t_final=2)
  >>> state = tx.init(trainable)
  >>> for _ in range(3):
  ...   grads = jax.tree.map(jnp.ones_like, trainable)
  ...   updates, state = tx.update(grads, state, trainable, value=1.0)
  ...   trainable = optax.apply_updates(trainable, updates)
  >>> int((trainable["gates"]["g"] != 0).sum())
  1
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrank import _budget
from jaxrank import _nonfinite
from jaxrank import _orthogonalize
from jaxrank import _tree
from jaxrank._sora import _no_gates_error
from jaxrank._sora import _value
from jaxrank._sora import GATE_COLLECTION
from jaxrank._sora import GATE_NAME
from jaxrank._sora import ScalarOrSchedule

Array = jax.Array


def sora_budget_schedule(capacity: int, budget: jax.typing.ArrayLike, t_init: int,
                         t_final: int) -> Callable[[Array], Array]:
  """``b(t)``: ``capacity`` until ``t_init``, cubic decrease to ``budget`` at ``t_final``.

  ``b(t) = b + (N − b)(1 − (t − t_init)/(t_final − t_init))³`` (AdaLoRA's eq. 9 schedule,
  rounded down), and exactly ``b`` from ``t_final − 1`` on: the last pruning step of
  :func:`sora_budget` meets the budget even when the window is too short for the cubic to
  round down to it.

  >>> [int(sora_budget_schedule(40, 10, 10, 20)(t)) for t in (0, 10, 15, 19, 20, 99)]
  [40, 40, 13, 10, 10, 10]
  """
  span = max(int(t_final) - int(t_init), 1)

  def schedule(t):
    frac = jnp.clip((jnp.asarray(t, jnp.float32) - t_init) / span, 0.0, 1.0)
    b = jnp.asarray(budget, jnp.float32)
    cubic = jnp.floor(b + (capacity - b) * (1.0 - frac) ** 3)
    return jnp.where(jnp.asarray(t) >= t_final - 1, b, cubic).astype(jnp.int32)

  return schedule


class SoraBudgetState(NamedTuple):
  """State of :func:`sora_budget`.

  Attributes:
    count: optimizer steps taken.
    loss_ema: EMA of the task loss ``value`` (not debiased; see ``loss_ema_debias``).
    loss_ema_debias: ``1 − decay^t`` (Adam-style bias correction of ``loss_ema``).
    grad_sq: per gate leaf (tree order), EMA of the squared gate gradient.
    inner_state: the inner optimizer's state.
    nonfinite_count: updates skipped because the gradient or the loss was not finite.
  """

  count: chex.Array
  loss_ema: chex.Array
  loss_ema_debias: chex.Array
  grad_sq: Any
  inner_state: optax.OptState
  nonfinite_count: chex.Array


def _gate_keys(tree, collection: Optional[str], gate_name: str) -> list:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [_tree.keypath_names(p) for p, _ in flat if _tree.is_named_leaf(p, gate_name, collection)]


def _factor_keys(gate_key) -> tuple:
  prefix = gate_key[1:-1]
  return (_tree.LORA, *prefix, "A"), (_tree.LORA, *prefix, "B")


def _rank_norms(leaves, key) -> Array:
  """``‖A_{:,i}‖ · ‖B_{i,:}‖`` of the layer of gate ``key``, or ones without factors."""
  a_key, b_key = _factor_keys(key)
  if a_key not in leaves or b_key not in leaves:
    return jnp.ones_like(leaves[key], jnp.float32)
  down, up = leaves[a_key].astype(jnp.float32), leaves[b_key].astype(jnp.float32)
  r = down.shape[-1]
  return jnp.linalg.norm(down.reshape(-1, r), axis=0) * jnp.linalg.norm(up.reshape(r, -1), axis=1)


def sora_orthogonalize(params, collection: Optional[str] = GATE_COLLECTION,
                       gate_name: str = GATE_NAME):
  """Rewrites every layer's live ranks in the SVD form of ``ΔW ∝ A diag(g) B``; ``ΔW`` unchanged.

  jaxrank's engineering, not the paper. With ``A = Q_a R_a`` and ``Bᵀ = Q_b R_b`` (thin QR)
  the core ``C = R_a diag(g) R_bᵀ = U diag(s) Vᵀ`` has the singular values of ``A diag(g) B``.
  The ``L`` live slots (``g ≠ 0``, in order) receive the ``L`` leading singular triplets in the
  balanced form ``a_j = (Q_a U)_j s_j^{1/3}``, ``g_j = s_j^{1/3}``, ``b_j = s_j^{1/3} (Q_b V)_jᵀ``;
  dead slots keep their factors and ``g = 0``. Afterwards the score ``|g_i| ‖a_i‖ ‖b_i‖`` of a
  live rank is its singular value. Only 2-D factors; jit-safe.
  """
  leaves = _tree.leaves_by_key(params)
  new = {}
  for key in _gate_keys(params, collection, gate_name):
    a_key, b_key = _factor_keys(key)
    if a_key not in leaves or b_key not in leaves:
      continue
    g, down, up = leaves[key], leaves[a_key], leaves[b_key]
    if down.ndim != 2 or up.ndim != 2 or g.ndim != 1:
      raise ValueError("sora_orthogonalize supports 2-D factors (one matrix per gate) only.")
    new[a_key], new[b_key], new[key] = _orthogonalize.svd_form(down, up, g, split="gate")
  return _tree.replace_leaves(params, new)


def sora_budget(
    inner: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    *,
    budget: jax.typing.ArrayLike,
    t_init: int,
    t_final: int,
    lam: ScalarOrSchedule = 0.1,
    normalize: bool = True,
    loss_decay: float = 0.98,
    grad_decay: float = 0.999,
    min_keep_fraction: float = 0.5,
    orthogonalize_every: Optional[int] = None,
    collection: Optional[str] = GATE_COLLECTION,
    gate_name: str = GATE_NAME,
) -> optax.GradientTransformationExtraArgs:
  """SoRA with a budget: the proximal gate step (eq. 10-11) under a shrinking rank budget.

  ``inner`` (e.g. ``optax.adamw(lr)``) computes every leaf's update ``u_t``; on the gates,
  with ``g' = g_t + u_t`` and the score ``s_i = |g'_i| ‖A_{:,i}‖ ‖B_{i,:}‖`` (the Frobenius
  norm of rank ``i``'s term of ΔW, invariant to rescaling ``g`` against the factors):

  * ``t < t_init``: ``g_{t+1} = g'`` (dense warm-up);
  * ``t_init ≤ t < t_final``: the ``b(t)`` ranks of largest ``s`` over *all* gates stay live
    (:func:`sora_budget_schedule`), every other gate becomes exactly 0, and the live gates
    take eq. 10-11's soft-threshold, ``g_{t+1} = sign(g') max(|g'| − ξ_t, m |g'|)``
    (``m = min_keep_fraction``, jaxrank's: the L1 step may shrink a kept rank but not remove
    it, so the live count is exactly ``b(t)``);
  * ``t ≥ t_final``: the pattern is frozen (a zero gate stays 0), ``ξ = 0``: recovery.

  The threshold (eq. 10 is ``ξ = η_t λ`` for ``L_0 + λ ‖g‖_1`` under SGD):

  * ``normalize=True`` (jaxrank): the objective is ``L_0 / L̄_0 + λ ‖g‖_1`` with ``L̄_0`` the
    debiased EMA of the task loss, prox'ed in Adam's metric ``D_i = √v̂_i`` (``v̂``: EMA of the
    squared gate gradient): ``ξ_{t,i} = η_t λ L̄_0 / D_i``. Scaling the loss by ``c`` scales
    ``L̄_0`` and ``D`` by ``c``, so ``ξ`` does not change.
  * ``normalize=False``: the paper's ``ξ_t = η_t λ`` (eq. 10 exactly with an SGD ``inner``).

  ``update`` needs ``params`` and, with ``normalize=True``, the task loss as ``value=``
  (``jaxrank.train`` passes it).

  Args:
    inner: the optimizer of factors and gates.
    learning_rate: η_t, the gates' step size in ``inner`` (float or schedule).
    budget: total live ranks at the end (over all gates).
    t_init, t_final: the budget schedule's steps.
    lam: λ (float or schedule of the step).
    normalize: see above.
    loss_decay, grad_decay: EMA decays of ``L̄_0`` and ``v̂``.
    min_keep_fraction: ``m`` above.
    orthogonalize_every: ``K``: on steps ``t_init + jK < t_final`` (and ``t_final − 1``),
      before scoring, every layer is rewritten by :func:`sora_orthogonalize` and the inner
      optimizer's first moments are zeroed (they refer to the old basis). ``None``: never.
    collection, gate_name: where the gates live (``gates/.../g``).
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    gates = _tree.named_leaves(params, gate_name, collection)
    if not gates:
      raise _no_gates_error("sora_budget.init", collection, gate_name)
    return SoraBudgetState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32),
                           jnp.zeros([], jnp.float32),
                           [jnp.zeros_like(g, jnp.float32) for g in gates], inner.init(params),
                           jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sora_budget needs params: call tx.update(grads, state, params).")
    value = extra_args.get("value")
    if normalize and value is None:
      raise ValueError(
          "sora_budget(normalize=True) needs the task loss: tx.update(grads, state, params, "
          "value=loss) (jaxrank.train passes it); or use normalize=False.")
    count = state.count
    keys = _gate_keys(params, collection, gate_name)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    raw = _tree.leaves_by_key(updates)
    grad_sq = [grad_decay * v + (1 - grad_decay) * jnp.square(raw[k].astype(jnp.float32))
               for v, k in zip(state.grad_sq, keys)]
    debias = 1.0 - loss_decay ** (count + 1).astype(jnp.float32)
    loss_ema = state.loss_ema
    if value is not None:
      loss_ema = loss_decay * loss_ema + (1 - loss_decay) * jnp.asarray(value, jnp.float32)
    eta, lam_t = _value(learning_rate, count), _value(lam, count)
    if normalize:
      grad_debias = 1.0 - grad_decay ** (count + 1).astype(jnp.float32)
      loss_bar = loss_ema / debias  # L̄_0
      thresholds = [eta * lam_t * loss_bar / (jnp.sqrt(v / grad_debias) + 1e-30)
                    for v in grad_sq]  # ξ_i = η λ L̄_0 / √v̂_i (jaxrank)
    else:
      thresholds = [eta * lam_t * jnp.ones_like(v) for v in grad_sq]  # ξ = η_t·λ (eq. 10)

    pruning = jnp.logical_and(count >= t_init, count < t_final)
    leaves_p = _tree.leaves_by_key(params)
    if orthogonalize_every:
      # jaxrank: rotate the stepped factors to the SVD form of each core, zero the first moments
      rotate = jnp.logical_and(pruning, jnp.logical_or(
          (count - t_init) % orthogonalize_every == 0, count == t_final - 1))
      full = optax.apply_updates(params, inner_updates)
      full = jax.lax.cond(rotate, lambda p: sora_orthogonalize(p, collection, gate_name),
                          lambda p: p, full)
      inner_updates = jax.tree.map(lambda n, p: (n - p).astype(n.dtype), full, params)
      inner_state = _orthogonalize.zero_first_moments(inner_state, rotate)
      leaves_s = _tree.leaves_by_key(full)
    else:
      leaves_s = leaves_p
    given = _tree.leaves_by_key(inner_updates)
    stepped = [leaves_p[k] + given[k].astype(leaves_p[k].dtype) for k in keys]
    scores = [jnp.abs(g1.astype(jnp.float32)) * _rank_norms(leaves_s, k)
              for g1, k in zip(stepped, keys)]
    b_t = sora_budget_schedule(sum(s.size for s in scores), budget, t_init, t_final)(count)
    keep = _budget.exact_top_masks(scores, b_t, positive=True)
    frozen = count >= t_final
    new = {}
    for key, g1, k, xi in zip(keys, stepped, keep, thresholds):
      p = leaves_p[key]
      mag = jnp.abs(g1)
      shrunk = jnp.sign(g1) * jnp.maximum(mag - xi.astype(g1.dtype), min_keep_fraction * mag)
      pruned = jnp.where(k, shrunk, jnp.zeros_like(g1))  # top-b(t) live, T_ξ (eq. 10-11)
      recovered = jnp.where(p == 0, jnp.zeros_like(g1), g1)  # frozen pattern, ξ = 0
      new[key] = jnp.where(pruning, pruned, jnp.where(frozen, recovered, g1)) - p
    new_updates = _tree.replace_leaves(inner_updates, new)
    return new_updates, SoraBudgetState(optax.safe_increment(count), loss_ema, debias,
                                        grad_sq, inner_state, state.nonfinite_count)

  return optax.GradientTransformationExtraArgs(init_fn, _nonfinite.skip_if_not_finite(update_fn))
