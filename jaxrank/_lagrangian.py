"""SaLoRA's min-max optimizer (eq. 12): the Lagrange multiplier λ and its projected ascent.

SaLoRA minimises ``task + β Σ R_orth + λ (C(Θ) - b)²`` over the adapter and its gates and
maximises it over ``λ >= 0``. λ is a scalar leaf ``gates/lagrange_multiplier`` of the
variables (:func:`add_lagrange_multiplier`), so the loss is differentiated with respect to it
like any other leaf; :func:`lagrangian_ascent` wraps the inner optimizer, takes the
projected ascent step ``λ ← max(0, λ + η_λ ∂L/∂λ)`` and trains ``log θ`` and λ only inside
the window ``[t_start, t_end)`` of optimizer steps. Leaves are found by name (:mod:`jaxrank._tree`).

jaxrank's engineering beyond eq. 12 (each off by default in this transform; the SaLoRA recipe
turns them on):

* ``log θ`` has its own optimizer state that advances only inside the window, so a late
  window starts with a first (bias-corrected) Adam step;
* the loss-scale normalisation: a ``gates/loss_scale`` leaf (:func:`salora_add_loss_scale`)
  holds the EMA ``L̄`` of the task loss passed as ``value=``; :func:`jaxrank.salora_penalty`
  then multiplies its terms by ``L̄`` so β and λ weigh the *relative* task loss;
* ``budget=b``: on the last window step the ``b`` ranks most likely open are hardened open and
  the rest closed inside the step, so the recovery steps train exactly ``b`` ranks.

Example:
  >>> import jax.numpy as jnp, optax, jaxrank
  >>> params = jaxrank.add_lagrange_multiplier({"gates": {"log_theta": jnp.zeros(2)}})
  >>> grads = {"gates": {"log_theta": jnp.ones(2), "lagrange_multiplier": jnp.asarray(0.5)}}
  >>> tx = jaxrank.lagrangian_ascent(2.0, optax.sgd(0.1), t_start=0, t_end=1,
  ...                                 total_steps=2)
  >>> updates, state = tx.update(grads, tx.init(params), params)
  >>> params = optax.apply_updates(params, updates)
  >>> float(jaxrank.lagrange_multiplier(params))
  1.0
  >>> [round(x, 3) for x in params["gates"]["log_theta"].tolist()]
  [-0.1, -0.1]
  >>> updates, state = tx.update(grads, state, params)  # step 1 is outside the window
  >>> float(jnp.abs(updates["gates"]["lagrange_multiplier"]))
  0.0
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _budget
from jaxrank import _nonfinite
from jaxrank import _orthogonalize
from jaxrank import _tree

Array = jax.Array
ScalarOrSchedule = Union[float, jax.typing.ArrayLike, Callable[[jax.typing.ArrayLike], Any]]

# the hard-concrete gate parameter of :class:`jaxrank.SaLoRA`, trained only inside the window
LOG_THETA = "log_theta"
LAGRANGE_MULTIPLIER = "lagrange_multiplier"
LOSS_SCALE = "loss_scale"
# |log θ| of a hardened gate (as jaxrank.salora_harden): sigmoid(±50) closes/opens it exactly
HARD_LOG_THETA = 50.0


# --- the Lagrange multiplier ---------------------------------------------------------------
def add_lagrange_multiplier(variables, value: float = 0.0) -> dict:
  """Returns ``variables`` with a scalar ``gates/lagrange_multiplier`` (λ of eq. 12).

  Works on full variables or on the trainable dict of :func:`jaxrank.split_variables`.
  """
  if value < 0:
    raise ValueError(f"the Lagrange multiplier must start >= 0, got {value!r}.")
  variables = _tree.plain(variables)
  if "gates" not in variables:
    raise ValueError(
        "These variables hold no 'gates' collection: make them with "
        "jaxrank.wrap(..., adapter=jaxrank.SaLoRA(...)).init(...)."
    )
  gates = _tree.plain(variables["gates"])
  gates[LAGRANGE_MULTIPLIER] = jnp.asarray(value, jnp.float32)
  return {**variables, "gates": gates}


def salora_add_loss_scale(variables, value: float = 1.0) -> dict:
  """Returns ``variables`` with a scalar ``gates/loss_scale`` (``L̄``, the task-loss EMA).

  jaxrank's normalisation, not the paper's: with it, :func:`jaxrank.salora_penalty` returns
  ``L̄ · (β Σ R_orth + λ (C(Θ) − b)²)`` (no gradient through ``L̄``) and
  :func:`lagrangian_ascent` keeps ``L̄`` equal to the debiased EMA of the task loss it is given
  as ``value``: multiplying the loss by a constant then changes neither the gates' nor λ's
  trajectory (with a scale-free inner optimizer such as Adam). Without the leaf the penalty
  is eq. 12 as written.

  >>> import jax.numpy as jnp, jaxrank
  >>> float(jaxrank.salora_add_loss_scale({"gates": {}})["gates"]["loss_scale"])
  1.0
  """
  variables = _tree.plain(variables)
  gates = _tree.plain(variables["gates"])
  gates[LOSS_SCALE] = jnp.asarray(value, jnp.float32)
  return {**variables, "gates": gates}


def lagrange_multiplier(variables) -> Array:
  """The current λ (``gates/lagrange_multiplier``)."""
  try:
    return variables["gates"][LAGRANGE_MULTIPLIER]
  except KeyError:
    raise ValueError(
        "No gates/lagrange_multiplier in these variables: call "
        "jaxrank.add_lagrange_multiplier(variables) once after init."
    ) from None


# --- the optimizer --------------------------------------------------------------------------
class UncheckedWindowWarning(UserWarning):
  """:func:`lagrangian_ascent` got ``t_end`` but no ``total_steps`` to check it against."""


class LagrangianAscentState(NamedTuple):
  """State of :func:`lagrangian_ascent`.

  Attributes:
    count: optimizer steps taken.
    inner_state: the inner optimizer's state (every leaf but ``log θ``, λ and ``loss_scale``).
    gate_state: the gate optimizer's state (``log θ`` only); it advances only on steps inside
      ``[t_start, t_end)``, so the first step of a late window is a first step.
    loss_ema: EMA of the task loss ``value`` (0 without ``value``).
    nonfinite_count: updates skipped because the gradient or the loss was not finite (λ and
      ``log θ`` then stay as they were).
  """

  count: chex.Array
  inner_state: optax.OptState
  gate_state: optax.OptState = ()
  loss_ema: chex.Array = 0.0
  nonfinite_count: chex.Array = 0


def _leaf_name(keypath) -> Optional[str]:
  names = _tree.keypath_names(keypath)
  return names[-1] if names else None


def _is_concrete_number(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and not callable(x) and np.ndim(x) == 0


def _names(tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p), tree)


def _harden_top(params, budget):
  """``log θ`` of every gate set to ``±HARD_LOG_THETA``: the ``budget`` largest ``log θ`` over
  all layers open (P(g > 0) of eq. 8 is monotone in ``log θ``), the rest closed; exact."""
  thetas = _tree.named_leaves(params, LOG_THETA)
  keep = iter(_budget.exact_top_masks([t.astype(jnp.float32) for t in thetas], budget))

  def leaf(path, x):
    if not _tree.is_named_leaf(path, LOG_THETA):
      return x
    return jnp.where(next(keep), HARD_LOG_THETA, -HARD_LOG_THETA).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, params)


def _rotate_factors(rotate, params, updates, inner_state):
  """Where ``rotate``: the stepped factors of every gated matrix in SVD form, first moments zeroed."""
  leaves, given = _tree.leaves_by_key(params), _tree.leaves_by_key(updates)
  pairs = [((_tree.LORA, *key[1:-1], "A"), (_tree.LORA, *key[1:-1], "B"), key) for key in leaves
           if key[-1] == LOG_THETA and key[0] == _tree.GATES]
  pairs = [(a, b, key) for a, b, key in pairs if a in leaves and b in leaves]

  def rotated(factors):
    out = {}
    for a_key, b_key, key in pairs:
      ones = jnp.ones(leaves[key].shape, factors[a_key].dtype)  # every rank live
      stepped = [leaves[k] + factors[k] for k in (a_key, b_key)]
      down, up, _ = _orthogonalize.svd_form(*stepped, ones, split="factors")
      for k, v in ((a_key, down), (b_key, up)):
        out[k] = (v - leaves[k]).astype(factors[k].dtype)
    return out

  factors = {k: given[k] for a_key, b_key, _ in pairs for k in (a_key, b_key)}
  # jnp.where, not lax.cond: a cond around sharded SVDs deadlocked XLA:CPU's collectives
  factors = jax.tree.map(lambda new, old: jnp.where(rotate, new, old), rotated(factors), factors)
  return _tree.replace_leaves(updates, factors), _orthogonalize.zero_first_moments(
      inner_state, rotate)


def lagrangian_ascent(
    learning_rate: ScalarOrSchedule,
    inner: optax.GradientTransformation,
    *,
    t_start: jax.typing.ArrayLike,
    t_end: jax.typing.ArrayLike,
    total_steps: Optional[int] = None,
    gate_optimizer: Optional[optax.GradientTransformation] = None,
    budget: Optional[jax.typing.ArrayLike] = None,
    orthogonalize: bool = False,
    loss_decay: float = 0.98,
) -> optax.GradientTransformationExtraArgs:
  """SaLoRA's min-max optimizer (eq. 12): descent on everything, projected ascent on λ.

  * ``λ`` (every leaf named ``lagrange_multiplier``) takes a projected gradient *ascent* step
    ``λ ← max(0, λ + η_λ ∂L/∂λ / L̄)``; the inner optimizers never see its gradient. ``L̄`` is
    the ``loss_scale`` leaf when the tree holds one (:func:`salora_add_loss_scale`), else 1
    (the paper's ``λ ← max(0, λ + η_λ (C(Θ) − b)²)``); with the normalised penalty
    ``∂L/∂λ = L̄ (C − b)²``, so either way λ grows by ``η_λ (C − b)²``.
  * ``log θ`` (leaves named ``log_theta``) is updated by ``gate_optimizer`` (default: a second
    copy of ``inner``) whose state advances only on steps ``t_start <= step < t_end``.
  * Every other leaf is updated by ``inner`` (e.g. ``optax.adam``).
  * ``log θ`` and ``λ`` move only on optimizer steps ``t_start <= step < t_end`` (steps count
    from 0); outside that window their updates are exactly zero.
  * ``budget`` (total ranks): on step ``t_end − 1`` the ``budget`` ranks of largest ``log θ``
    over all layers get ``log θ = +50``, every other ``−50``, inside the step, so later steps
    (recovery, gates frozen) train exactly ``budget`` ranks. ``None``: no hardening in the
    step (:func:`jaxrank.salora_harden` after training).
  * ``loss_scale`` leaves (if any) are set to the debiased EMA of the task loss ``value``
    (``loss_decay``); ``update`` then needs ``value=`` (``jaxrank.train`` passes it).

  Place it where the gates and λ are optimised: on the trainable dict, on full variables
  (combine with ``optax.partition`` to freeze ``params``), or inside ``optax.partition`` for
  the ``gates`` label. ``learning_rate`` may be a schedule; ``learning_rate``, ``t_start`` and
  ``t_end`` can be injected with ``optax.inject_hyperparams`` (pass the step bounds as
  ``static_args`` to keep the construction-time checks).

  With eq. 12's quadratic term, ``∂L/∂λ = (C(Θ) - b)² >= 0``, so λ never decreases and grows
  while ``C(Θ) != b``; the projection matters when a loss gives λ a negative gradient. Trees
  without a ``lagrange_multiplier`` leaf are fine (only the window on ``log θ`` applies).

  Args:
    learning_rate: η_λ, the ascent step size on λ (a float or a schedule of the step).
    inner: the optimizer for everything but ``log θ``, λ and ``loss_scale``.
    t_start: first optimizer step on which ``log θ`` and λ are updated.
    t_end: the first step after the window (``t_start <= t_end``).
    total_steps: the training length, if known; the window must fit in it.
    gate_optimizer: the optimizer of ``log θ`` (default ``inner``).
    budget: total ranks kept by the in-step hardening at ``t_end − 1``, or ``None``.
    orthogonalize: True (jaxrank's, opt-in): on the step before the window
      (``t_start − 1``; nothing when ``t_start = 0``) every matrix's factors are
      rewritten in the SVD form of ``A B`` (``ΔW`` unchanged, :mod:`jaxrank._orthogonalize`)
      and the inner first moments are zeroed, so each gate starts on one singular direction instead of
      one of several non-orthogonal pieces of the same direction. False: the paper's.
    loss_decay: EMA decay of the ``loss_scale`` leaves.
  """
  concrete = [_is_concrete_number(t) for t in (t_start, t_end)]
  if concrete[0] and int(t_start) < 0:
    raise ValueError(f"t_start must be >= 0, got {t_start!r}.")
  if all(concrete) and int(t_start) >= int(t_end):
    raise ValueError(
        f"t_start ({t_start}) is not before t_end ({t_end}): the window [t_start, t_end) in "
        "which log θ and λ are trained would be empty, so the gates would never train. Use "
        "t_start < t_end."
    )
  if total_steps is None and concrete[1]:
    warnings.warn(
        f"lagrangian_ascent: t_end={t_end} is given without total_steps, so nothing checks "
        "that the gate window ends before training does (past the end, the gates are never "
        "hardened and λ never settles). Pass total_steps=<optimizer steps of the run>.",
        UncheckedWindowWarning, stacklevel=2)
  if total_steps is not None:
    if int(total_steps) <= 0:
      raise ValueError(f"total_steps must be positive, got {total_steps!r}.")
    if concrete[1] and int(t_end) > int(total_steps):
      raise ValueError(
          f"t_end ({t_end}) is past the end of training (total_steps={total_steps}): lower "
          "t_end or raise total_steps."
      )
  if _is_concrete_number(learning_rate) and float(learning_rate) < 0:
    raise ValueError(
        f"learning_rate must be >= 0 (the ascent direction is built in), got {learning_rate!r}."
    )
  gate_optimizer = inner if gate_optimizer is None else gate_optimizer
  special = (LAGRANGE_MULTIPLIER, LOG_THETA, LOSS_SCALE)
  inner = optax.with_extra_args_support(optax.masked(
      inner, lambda tree: jax.tree.map(lambda n: n not in special, _names(tree))))
  gate_tx = optax.with_extra_args_support(optax.masked(
      gate_optimizer, lambda tree: jax.tree.map(lambda n: n == LOG_THETA, _names(tree))))

  def init_fn(params):
    return LagrangianAscentState(jnp.zeros([], jnp.int32), inner.init(params),
                                 gate_tx.init(params), jnp.zeros([], jnp.float32),
                                 jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "lagrangian_ascent needs params (the current λ, for the projection onto λ >= 0): "
          "call tx.update(grads, state, params)."
      )
    count = state.count
    active = jnp.logical_and(count >= t_start, count < t_end)
    eta = learning_rate(count) if callable(learning_rate) else learning_rate
    value = extra_args.get("value")
    scale_leaves = _tree.named_leaves(params, LOSS_SCALE)
    if scale_leaves and value is None:
      raise ValueError(
          "These variables hold gates/loss_scale (the loss-relative normalisation): pass the "
          "task loss, tx.update(grads, state, params, value=loss) (jaxrank.train does).")
    loss_ema = state.loss_ema
    if value is not None:
      loss_ema = loss_decay * loss_ema + (1 - loss_decay) * jnp.asarray(value, jnp.float32)
    loss_bar = loss_ema / (1.0 - loss_decay ** (count + 1).astype(jnp.float32))
    scale_now = scale_leaves[0] if scale_leaves else jnp.ones([], jnp.float32)

    inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    if orthogonalize:
      rotate = count == jnp.asarray(t_start) - 1  # never at t_start = 0 (B = 0: nothing to do)
      inner_updates, inner_state = _rotate_factors(rotate, params, inner_updates, inner_state)
    gate_updates, new_gate_state = gate_tx.update(updates, state.gate_state, params,
                                                  **extra_args)
    # jaxrank: the gate optimizer counts only window steps (a late window starts afresh)
    gate_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_gate_state,
                              state.gate_state)

    def final(path, u, gu, g, p):
      name = _leaf_name(path)
      if name == LAGRANGE_MULTIPLIER:
        step = g / jnp.maximum(scale_now, 1e-30)  # ∂L/∂λ / L̄ = (C(Θ) − b)²
        ascended = jnp.maximum(p + eta * step, 0.0)  # projected ascent onto λ >= 0 (eq. 12)
        return jnp.where(active, ascended - p, jnp.zeros_like(p)).astype(u.dtype)
      if name == LOG_THETA:
        return jnp.where(active, gu, jnp.zeros_like(gu))
      if name == LOSS_SCALE:
        return (loss_bar - p).astype(p.dtype)
      return u

    new_updates = jax.tree_util.tree_map_with_path(final, inner_updates, gate_updates, updates,
                                                   params)
    if budget is not None:
      stepped = optax.apply_updates(params, new_updates)
      hardened = jax.lax.cond(count == t_end - 1, lambda q: _harden_top(q, budget),
                              lambda q: q, stepped)
      new_updates = jax.tree.map(lambda h, p: (h - p).astype(p.dtype), hardened, params)
    return new_updates, LagrangianAscentState(optax.safe_increment(count), inner_state,
                                              gate_state, loss_ema, state.nonfinite_count)

  return optax.GradientTransformationExtraArgs(init_fn, _nonfinite.skip_if_not_finite(update_fn))
