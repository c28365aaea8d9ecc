"""Save and restore a whole training state with orbax-checkpoint.

The state is any pytree: typically the trainable variables (``lora`` and ``gates``), the optax
state (with every method's NamedTuple state inside), the step and the rng key. Typed PRNG keys
(``jax.random.key``) are stored as their raw key data and rebuilt on restore.

Each save goes to a temporary folder that orbax renames into place only when complete, so a
save interrupted midway leaves the previous checkpoint intact and loadable.

Restoring onto another mesh or sharding: pass a ``target`` whose leaves carry the wanted
sharding (concrete arrays placed where you want them, or ``jax.ShapeDtypeStruct`` with a
``sharding``); without one, arrays are restored as they were saved.

Example:
  >>> import tempfile, jax, jax.numpy as jnp, jaxrank
  >>> state = {"step": jnp.array(3), "rng": jax.random.key(0), "w": jnp.ones(2)}
  >>> directory = tempfile.mkdtemp()
  >>> jaxrank.checkpoint.save(directory, 3, state)
  >>> restored = jaxrank.checkpoint.restore(directory, state)
  >>> int(restored["step"]), jaxrank.checkpoint.latest_step(directory)
  (3, 3)
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_prng_key(x) -> bool:
  return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key
  )


def _to_storable(state):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_prng_key(x) else x, state)


def _abstract(x):
  if _is_prng_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype)
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _manager(directory, max_to_keep: Optional[int]) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def save(directory, step: int, state: Any, *, max_to_keep: Optional[int] = 3) -> None:
  """Writes ``state`` as checkpoint ``step`` under ``directory`` and waits until it is durable."""
  with _manager(directory, max_to_keep) as manager:
    manager.save(int(step), args=ocp.args.StandardSave(_to_storable(state)))
    manager.wait_until_finished()


def latest_step(directory) -> Optional[int]:
  """The newest complete checkpoint's step, or None when there is none."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory, None) as manager:
    return manager.latest_step()


def restore(directory, target: Any, *, step: Optional[int] = None) -> Any:
  """Reads checkpoint ``step`` (default: the latest complete one) into ``target``'s structure.

  Args:
    directory: where :func:`save` wrote.
    target: a pytree with the same structure as the saved state (the freshly initialised
      state works); leaf shardings, where given, decide where restored arrays live.
    step: which checkpoint; None for the latest.

  Raises:
    FileNotFoundError: when ``directory`` holds no complete checkpoint (or not ``step``).
  """
  with _manager(directory, None) as manager:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
    if step is None or step not in steps:
      raise FileNotFoundError(
          f"No complete checkpoint{'' if step is None else f' for step {step}'} in "
          f"{directory!r} (complete steps: {sorted(steps)})."
      )
    abstract = jax.tree.map(_abstract, target)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return jax.tree.map(
      lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_prng_key(t) else r,
      target,
      restored,
  )


def save_train_state(directory, state, *, max_to_keep: Optional[int] = 3) -> str:
  """Saves a whole train state (step, trainable tree, optimizer state, rng) under its step.

  ``state`` has a ``step`` field (e.g. ``jaxrank.train.TrainState``); one sub-folder per step,
  the newest ``max_to_keep`` kept. Restore with ``restore(directory, target)`` where
  ``target`` is a state of the same structure (e.g. the one ``jaxrank.train.fit`` returns).
  Returns the absolute directory. ``jaxrank.train.save_checkpoint`` is this function.
  """
  path = os.path.abspath(os.fspath(directory))
  save(path, int(state.step), state, max_to_keep=max_to_keep)
  return path
