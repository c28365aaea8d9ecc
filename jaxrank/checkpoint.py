"""Save and restore a whole training state with orbax-checkpoint.

The state is any pytree: typically the trainable variables (``lora`` and ``gates``), the optax
state (with every method's NamedTuple state inside), the step and the rng key. Typed PRNG keys
(``jax.random.key``) are stored as their raw key data and rebuilt on restore.

Each save goes to a temporary folder that orbax renames into place only when complete, so a
save interrupted midway leaves the previous checkpoint intact and loadable.

Integrity: after orbax finished a save, process 0 writes ``jaxrank_checksums.json`` into the
step's folder (the sha256 and size of every file there, and the sha256 of every saved array it
holds in full); :func:`restore` checks the files first, the restored arrays after, and
raises :class:`CorruptCheckpointError` naming the damaged file, the step and the steps that
remain, instead of loading flipped bytes silently or failing deep inside orbax;
``restore(..., fallback=True)`` goes back to the newest intact step instead. Checkpoints
without the manifest (written by older jaxrank) restore unchecked.

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

import hashlib
import json
import os
import warnings
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


MANIFEST = "jaxrank_checksums.json"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint file does not match the checksum written at save (damaged or truncated)."""


class CorruptCheckpointWarning(UserWarning):
  """``restore(..., fallback=True)`` skipped a damaged step for an earlier intact one."""


def _is_prng_key(x) -> bool:
  return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key
  )


def _to_storable(state):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_prng_key(x) else x, state)


def _abstract(x):
  if _is_prng_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    # the key's own placement, so a job of another process count / mesh restores it there
    sharding = x.sharding if isinstance(x, jax.Array) else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
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
  storable = _to_storable(state)
  with _manager(directory, max_to_keep) as manager:
    manager.save(int(step), args=ocp.args.StandardSave(storable))
    manager.wait_until_finished()
    step_dir = _step_dir(manager, int(step))
  if jax.process_index() == 0 and os.path.isdir(step_dir):
    _write_manifest(step_dir, int(step), _array_digests(storable))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"jaxrank_checksums_{int(step)}")


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _files(step_dir: str) -> list[str]:
  """Every file of the step folder except the manifest, as sorted relative paths."""
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        found.append(rel)
  return sorted(found)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _array_digests(storable) -> dict:
  """``{leaf path: {"dtype", "sha256"}}`` of every array this process holds in full (in a
  multi-process job: the replicated ones, read from a local copy)."""
  digests = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(storable)[0]:
    if not getattr(leaf, "is_fully_addressable", True) and leaf.is_fully_replicated:
      leaf = leaf.addressable_data(0)
    if getattr(leaf, "is_fully_addressable", True):
      data = np.ascontiguousarray(np.asarray(leaf))
      digests[jax.tree_util.keystr(path)] = {"dtype": str(data.dtype),
                                             "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
  return digests


def _write_manifest(step_dir: str, step: int, arrays: Optional[dict] = None) -> None:
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"step": step, "files": files, "arrays": arrays or {}}, f, indent=1)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def _verify_arrays(directory, step: int, steps, saved: dict, restored) -> None:
  """Raises :class:`CorruptCheckpointError` when a restored array's bytes differ from save
  (``saved``: the manifest's ``arrays`` entry, as :func:`_verify` read it)."""
  for name, now in _array_digests(restored).items():
    entry = saved.get(name)
    if entry is not None and entry["dtype"] == now["dtype"] and entry["sha256"] != now["sha256"]:
      _corrupt(directory, step, steps, name, "(an array) restored other values than were saved")


def _verify(directory, step_dir: str, step: int, steps) -> dict:
  """Raises :class:`CorruptCheckpointError` when a file differs from the manifest; returns the
  manifest's per-array checksums (empty for checkpoints written without them)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return {}  # written before jaxrank kept checksums
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
  except (OSError, ValueError, KeyError) as error:
    _corrupt(directory, step, steps, MANIFEST, f"its checksum manifest is unreadable ({error})")
  for rel, entry in files.items():
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      _corrupt(directory, step, steps, rel, "is missing")
    size = os.path.getsize(full)
    if size != entry["size"]:
      _corrupt(directory, step, steps, rel,
               f"is truncated or resized: {size} bytes, {entry['size']} at save")
    if _sha256(full) != entry["sha256"]:
      _corrupt(directory, step, steps, rel, "has other bytes than at save (sha256 mismatch)")
  return manifest.get("arrays", {})


def _corrupt(directory, step: int, steps, rel: str, problem: str):
  earlier = [s for s in sorted(steps) if s != step]
  hint = (f"Restore an earlier step instead, e.g. restore(directory, target, step={earlier[-1]})"
          if earlier else "No other step is available: retrain, or restore a backup copy")
  raise CorruptCheckpointError(
      f"Checkpoint step {step} in {os.fspath(directory)!r} is damaged: file {rel!r} {problem}. "
      f"{hint}. Available steps: {sorted(steps)}.")


def latest_step(directory) -> Optional[int]:
  """The newest complete checkpoint's step, or None when there is none."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory, None) as manager:
    return manager.latest_step()


def restore(directory, target: Any, *, step: Optional[int] = None,
            fallback: bool = False) -> Any:
  """Reads checkpoint ``step`` (default: the latest complete one) into ``target``'s structure.

  Args:
    directory: where :func:`save` wrote.
    target: a pytree with the same structure as the saved state (the freshly initialised
      state works); leaf shardings, where given, decide where restored arrays live.
    step: which checkpoint; None for the latest.
    fallback: when the chosen step is damaged, restore the newest intact step before it
      instead of raising, with a :class:`CorruptCheckpointWarning` naming the skipped steps.

  Raises:
    FileNotFoundError: when ``directory`` holds no complete checkpoint (or not ``step``).
    CorruptCheckpointError: when a file of the step differs from its checksum at save
      (overwritten, truncated or missing); the message names the file and the other steps.
      With ``fallback``, only when no earlier step is intact either.
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
    candidates = [s for s in sorted(steps, reverse=True) if s <= step] if fallback else [step]
    abstract = jax.tree.map(_abstract, target)
    for attempt in candidates:
      step_dir = _step_dir(manager, attempt)
      try:
        saved_arrays = _verify(directory, step_dir, attempt, steps)
        restored = manager.restore(attempt, args=ocp.args.StandardRestore(abstract))
        _verify_arrays(directory, attempt, steps, saved_arrays, restored)
        break
      except CorruptCheckpointError as error:
        if attempt == candidates[-1]:
          raise
        warnings.warn(f"{error} Falling back to an earlier step.", CorruptCheckpointWarning,
                      stacklevel=2)
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
