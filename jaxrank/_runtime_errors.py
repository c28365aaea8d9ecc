"""Raise a clear Python error from inside ``jit`` when a traced condition holds.

Some misuse is only visible on traced values: a λ schedule that turns negative at step t, or
``sora_prox`` placed before the optimizer (seen when a gate it zeroed comes back nonzero).
:func:`raise_if` runs a host callback only when the condition holds (inside ``lax.cond``, so a
correct run pays nothing but the comparison) and raises there; JAX re-raises it from the jitted
call as a ``JaxRuntimeError`` whose message ends with ours.

Example:
  >>> import jax, jax.numpy as jnp
  >>> @jax.jit
  ... def half(x):
  ...   raise_if(x < 0, ValueError, "x must be >= 0, got {}", x)
  ...   return x / 2
  >>> float(half(4.0))
  2.0
"""

from __future__ import annotations

import jax
import numpy as np


def raise_if(condition: jax.Array, error_type: type, message: str, *values: jax.Array) -> None:
  """Raises ``error_type(message.format(*values))`` when the traced bool ``condition`` holds."""
  def callback(flag, *host_values):
    if bool(flag):  # checked again: under vmap the cond below becomes a select
      raise error_type(message.format(*[np.asarray(v).tolist() for v in host_values]))

  condition = jax.numpy.asarray(condition)
  jax.lax.cond(condition, lambda: jax.debug.callback(callback, condition, *values),
               lambda: None)
