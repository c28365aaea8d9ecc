"""Skip a method's update whose inputs are not finite, and count it (as optax.apply_if_finite).

A NaN or infinite gradient (or task loss ``value``) must never become a rank decision: SoRA's
soft-threshold would read it as a zero gate, AdaLoRA's top-b would mask every triplet, SaLoRA's
λ would become NaN. Every method transform therefore runs its update as usual and then, when an
input was not finite, returns zero updates and its *previous* state with ``nonfinite_count``
increased by one: the gates, the scores, the budget step and the pattern stay as they were.

This is the rule of ``optax.apply_if_finite`` applied inside each method (so a user's own loop
is protected without wrapping); ``jaxrank.train.fit`` also stops at the first non-finite loss or
gradient (:class:`jaxrank.NonFiniteError`) and reads :func:`nonfinite_total` to see whether a
method skipped anything, e.g. an ALoRA round whose validation scores were not finite.

Example:
  >>> import jax.numpy as jnp, optax, jaxrank
  >>> tx = optax.chain(optax.sgd(0.5), jaxrank.sora_prox(lam=1.0, learning_rate=0.5))
  >>> params = {"gates": {"g": jnp.array([1.0, 0.2])}}
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"gates": {"g": jnp.array([jnp.nan, 0.0])}}, state, params)
  >>> updates["gates"]["g"].tolist(), int(jaxrank.nonfinite_total(state))
  ([0.0, 0.0], 1)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


COUNT_FIELD = "nonfinite_count"
# ``optax.apply_if_finite(..., max_consecutive_errors=NEVER_GIVE_UP)``: skip every bad step
NEVER_GIVE_UP = 2**31 - 1


def all_finite(*trees: Any) -> jax.Array:
  """A traced bool: every inexact leaf of every tree is finite (None leaves are skipped)."""
  checks = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def select(keep_new: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where the traced bool ``keep_new`` holds, else ``old``, leaf by leaf (PRNG keys
  too); both trees have one structure."""
  def leaf(n, o):
    if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
      data = jnp.where(keep_new, jax.random.key_data(n), jax.random.key_data(o))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(n))
    return jnp.where(keep_new, n, o)
  return jax.tree.map(leaf, new, old)


def keep_if_finite(finite: jax.Array, new_updates: Any, new_state: Any, old_state: Any):
  """``(new_updates, new_state)`` when ``finite``; else zero updates and ``old_state`` with
  its ``nonfinite_count`` increased by one."""
  updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
  state = select(finite, new_state, old_state)
  old = getattr(old_state, COUNT_FIELD)
  count = jnp.where(finite, getattr(new_state, COUNT_FIELD), old + 1).astype(old.dtype)
  return updates, state._replace(**{COUNT_FIELD: count})


def skip_if_not_finite(update_fn: Callable) -> Callable:
  """Wraps a method's ``update_fn``: non-finite ``updates`` or ``value`` → nothing changes.

  The state must be a NamedTuple with a ``nonfinite_count`` field that ``update_fn`` carries
  over unchanged.
  """
  @functools.wraps(update_fn)
  def guarded(updates, state, params=None, **extra_args):
    new_updates, new_state = update_fn(updates, state, params, **extra_args)
    finite = all_finite(updates, extra_args.get("value"))
    return keep_if_finite(finite, new_updates, new_state, state)
  return guarded


def nonfinite_total(opt_state: Any) -> jax.Array:
  """How many updates the jaxrank method transforms (and ``optax.apply_if_finite``) in
  ``opt_state`` skipped because an input was not finite; 0 when there are none."""
  counts = []

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for field in (COUNT_FIELD, "total_notfinite"):  # the latter: optax.ApplyIfFiniteState
        if field in node._fields:
          counts.append(jnp.asarray(getattr(node, field), jnp.int32))
      children = [getattr(node, f) for f in node._fields
                  if f not in (COUNT_FIELD, "total_notfinite")]
    elif isinstance(node, (tuple, list)):
      children = list(node)
    elif isinstance(node, dict):
      children = list(node.values())
    else:
      return
    for child in children:
      visit(child)

  visit(opt_state)
  return sum(counts, jnp.zeros([], jnp.int32))
