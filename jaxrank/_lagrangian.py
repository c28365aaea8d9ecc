"""SaLoRA's min-max optimizer (eq. 12): the Lagrange multiplier λ and its projected ascent.

SaLoRA minimises ``task + β Σ R_orth + λ (C(Θ) - b)²`` over the adapter and its gates and
maximises it over ``λ >= 0``. λ is a scalar leaf ``gates/lagrange_multiplier`` of the
variables (:func:`add_lagrange_multiplier`), so the loss is differentiated with respect to it
like any other leaf; :func:`lagrangian_ascent` wraps the inner optimizer, takes the
projected ascent step ``λ ← max(0, λ + η_λ ∂L/∂λ)`` and trains ``log θ`` and λ only inside
the window ``[t_start, t_end)`` of optimizer steps. Leaves are found by name (:mod:`jaxrank._tree`).

Example:
  >>> import jax.numpy as jnp, optax, jaxrank
  >>> params = jaxrank.add_lagrange_multiplier({"gates": {"log_theta": jnp.zeros(2)}})
  >>> grads = {"gates": {"log_theta": jnp.ones(2), "lagrange_multiplier": jnp.asarray(0.5)}}
  >>> tx = jaxrank.lagrangian_ascent(2.0, optax.sgd(0.1), t_start=0, t_end=1)
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

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _tree

Array = jax.Array
ScalarOrSchedule = Union[float, jax.typing.ArrayLike, Callable[[jax.typing.ArrayLike], Any]]

# the hard-concrete gate parameter of :class:`jaxrank.SaLoRA`, trained only inside the window
LOG_THETA = "log_theta"
LAGRANGE_MULTIPLIER = "lagrange_multiplier"


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
class LagrangianAscentState(NamedTuple):
  """State of :func:`lagrangian_ascent`: the optimizer step count and the inner state."""

  count: chex.Array
  inner_state: optax.OptState


def _leaf_name(keypath) -> Optional[str]:
  names = _tree.keypath_names(keypath)
  return names[-1] if names else None


def _is_concrete_number(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and not callable(x) and np.ndim(x) == 0


def lagrangian_ascent(
    learning_rate: ScalarOrSchedule,
    inner: optax.GradientTransformation,
    *,
    t_start: jax.typing.ArrayLike,
    t_end: jax.typing.ArrayLike,
    total_steps: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  """SaLoRA's min-max optimizer (eq. 12): descent on everything, projected ascent on λ.

  * ``λ`` (every leaf named ``lagrange_multiplier``) takes a projected gradient *ascent* step
    ``λ ← max(0, λ + η_λ ∂L/∂λ)``; the inner optimizer never sees its gradient.
  * Every other leaf is updated by ``inner`` (e.g. ``optax.adam``).
  * ``log θ`` (leaves named ``log_theta``) and ``λ`` move only on optimizer steps
    ``t_start <= step < t_end`` (steps count from 0); outside that window their gradients
    are zeroed before ``inner`` and their updates are exactly zero.

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
    inner: the optimizer for everything else.
    t_start: first optimizer step on which ``log θ`` and λ are updated.
    t_end: the first step after the window (``t_start <= t_end``).
    total_steps: the training length, if known; the window must fit in it.
  """
  concrete = [_is_concrete_number(t) for t in (t_start, t_end)]
  if concrete[0] and int(t_start) < 0:
    raise ValueError(f"t_start must be >= 0, got {t_start!r}.")
  if all(concrete) and int(t_start) > int(t_end):
    raise ValueError(
        f"t_start ({t_start}) is after t_end ({t_end}): the window [t_start, t_end) in which "
        "log θ and λ are trained must satisfy t_start <= t_end."
    )
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
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return LagrangianAscentState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "lagrangian_ascent needs params (the current λ, for the projection onto λ >= 0): "
          "call tx.update(grads, state, params)."
      )
    count = state.count
    active = jnp.logical_and(count >= t_start, count < t_end)
    eta = learning_rate(count) if callable(learning_rate) else learning_rate

    def inner_grad(path, g):
      name = _leaf_name(path)
      if name == LAGRANGE_MULTIPLIER:
        return jnp.zeros_like(g)
      if name == LOG_THETA:
        return jnp.where(active, g, jnp.zeros_like(g))
      return g

    inner_updates, inner_state = inner.update(
        jax.tree_util.tree_map_with_path(inner_grad, updates), state.inner_state, params,
        **extra_args,
    )

    def final(path, u, g, p):
      name = _leaf_name(path)
      if name == LAGRANGE_MULTIPLIER:
        ascended = jnp.maximum(p + eta * g, 0.0)  # projected ascent onto λ >= 0
        return jnp.where(active, ascended - p, jnp.zeros_like(p)).astype(u.dtype)
      if name == LOG_THETA:
        return jnp.where(active, u, jnp.zeros_like(u))
      return u

    new_updates = jax.tree_util.tree_map_with_path(final, inner_updates, updates, params)
    return new_updates, LagrangianAscentState(optax.safe_increment(count), inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
