"""Multi-process (multi-host) jobs: start one process of the job, feed it only its rows of
every global batch, and write files once.

A multi-process job runs the same program in every process (one per host on a TPU pod, or
several CPU processes on one machine). After :func:`initialize`, ``jax.devices()`` lists the
devices of every process and a mesh over them (:func:`jaxrank.data_parallel_mesh`) spans the
job; ``jaxrank.train.fit`` then trains data-parallel over all of them, each process placing
only its own rows of every global batch (:func:`process_rows`, :func:`local_batches`). The
variables and the optimizer state are replicated, so every rank decision (AdaLoRA's budget,
ALoRA's rounds, SoRA's gates, SaLoRA's multiplier) is taken once, on the global gradients,
and every process holds the same pattern.

Checkpoints are written by all processes together (``jaxrank.checkpoint.save``: orbax writes
each process's shards, then process 0 writes the checksum manifest after a barrier). Files
that must exist once (a PEFT adapter, merged weights, metrics) go through :func:`write_once`:
process 0 writes, after a barrier, and the others wait for it.

If a process dies, JAX's coordination service notices the missing heartbeats and terminates
the others within ``heartbeat_timeout_seconds`` with ``The following tasks are unhealthy
(stopped sending heartbeats): <process ids>``; restart the whole job and resume from the last
checkpoint.

On CPU the processes exchange data with gloo (``jax_cpu_collectives_implementation``), which
:func:`initialize` selects.

Example (one process; in a job every process runs it with its own ``process_id``):
  >>> import numpy as np, jaxrank
  >>> mesh = jaxrank.data_parallel_mesh()
  >>> rows = jaxrank.distributed.process_rows(mesh, 4)   # all rows when alone
  >>> rows
  slice(0, 4, None)
  >>> place = jaxrank.distributed.local_batch_placement(mesh, 4)
  >>> batch = next(jaxrank.distributed.local_batches({"x": np.arange(8.0)}, 4, rows))
  >>> place(batch)["x"].shape
  (4,)
  >>> jaxrank.distributed.write_once("hello", lambda: "written")
  'written'
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxrank import batching


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, heartbeat_timeout_seconds: int = 100,
               initialization_timeout: int = 300) -> None:
  """Makes this process one process of a multi-process JAX job (``jax.distributed``).

  Call it first, before anything else uses JAX. With no arguments JAX detects the job itself
  (Cloud TPU pods, SLURM, Open MPI, ...; ``JAX_COORDINATOR_ADDRESS`` sets the address); else
  give all three.

  Args:
    coordinator: ``host:port`` of process 0 (which serves the coordination service there).
    num_processes: how many processes the job has.
    process_id: this process's index, ``0 <= process_id < num_processes``.
    heartbeat_timeout_seconds: after this long without a heartbeat from a process, the others
      are terminated with an error naming it.
    initialization_timeout: how long to wait for every process to join.

  Raises:
    ValueError: for only some of the three job arguments, a ``coordinator`` without a port, or
      a ``process_id`` outside ``[0, num_processes)``.
  """
  given = {"coordinator": coordinator, "num_processes": num_processes,
           "process_id": process_id}
  missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
  if missing and len(missing) < 3:
    raise ValueError(f"a multi-process job needs --coordinator, --num-processes and "
                     f"--process-id together; missing {', '.join(missing)}.")
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator must be host:port (e.g. localhost:1234), got "
                       f"{coordinator!r}.")
    if num_processes < 1:
      raise ValueError(f"--num-processes must be a positive integer, got {num_processes}.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process-id must be in [0, {num_processes}) for --num-processes "
                       f"{num_processes}, got {process_id}.")
  # CPU processes talk through gloo (the default "none" has no cross-process collectives)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                             initialization_timeout=initialization_timeout)


def is_multi_process() -> bool:
  """True when this process is one of several of a job (after :func:`initialize`)."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """True in process 0, the one that writes what must exist once."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process of the job reached ``barrier(name)`` (no-op when alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def write_once(name: str, write: Callable[[], Any]) -> Any:
  """Runs ``write()`` in process 0 only, after every process got here; returns its result
  there (None elsewhere). The other processes wait until it finished, so they never see a
  half-written file and never write there themselves.

  Raises:
    RuntimeError: in the other processes, when ``write()`` raised in process 0 (which
      re-raises its own error).
  """
  barrier(f"jaxrank_before_{name}")
  result, error = None, None
  if is_primary():
    try:
      result = write()
    except Exception as caught:  # noqa: BLE001  (re-raised below, after telling the others)
      error = caught
  failed = error is not None
  if is_multi_process():  # a collective: also the barrier after the write
    from jax.experimental import multihost_utils
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if error is not None:
    raise error
  if failed:
    raise RuntimeError(f"process 0 failed to write {name!r} (see its log); nothing was "
                       f"written by process {jax.process_index()}.")
  return result


def fetch(tree: Any) -> Any:
  """Every numeric array of ``tree`` as a numpy array of its global value, in every process.

  Replicated arrays are read locally; sharded ones are gathered from all processes (then it
  is a collective: call it in every process). Use it before :func:`write_once` hands host
  values to a writer that runs in process 0 only.
  """
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return jax.device_get(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``tree`` replicated on every device of ``mesh`` (``jax.device_put`` when one process
  holds the whole mesh). In a multi-process job each process passes its own equal copy (host
  values are copied; typed PRNG keys are moved as their key data)."""
  sharding = NamedSharding(mesh, PartitionSpec())
  if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    value = np.asarray(x)  # not device_put: its cross-process equality check fails on NaN
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(one, tree)


def process_rows(mesh: jax.sharding.Mesh, batch_size: int, data_axis: str = "data") -> slice:
  """The rows of a ``batch_size``-row global batch that this process places on its devices
  when the batch is split over ``mesh``'s ``data_axis``.

  Raises:
    ValueError: when ``batch_size`` does not split over the axis, or this process's devices
      hold no contiguous block of rows (order the mesh's devices by process, as
      ``jax.devices()`` does).
  """
  batching.batch_placement(mesh, data_axis, batch_size=batch_size)  # the size checks
  indices = NamedSharding(mesh, PartitionSpec(data_axis)).addressable_devices_indices_map(
      (batch_size,))
  starts = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
                   for i in indices.values()})
  for (_, stop), (start, _) in zip(starts, starts[1:]):
    if stop != start:
      raise ValueError(f"process {jax.process_index()} holds rows {starts} of each batch, not "
                       f"one block: build the mesh over jax.devices() (ordered by process).")
  return slice(starts[0][0], starts[-1][1])


def local_batches(data: Mapping[str, np.ndarray], batch_size: int, rows: slice, *,
                  seed: int = 0, drop_remainder: bool = True,
                  bucket_lengths: Optional[Sequence[int]] = None,
                  mask_key: str = "attention_mask") -> Iterator[dict]:
  """This process's ``rows`` (:func:`process_rows`) of every global batch of
  :func:`jaxrank.batching.batches` (same arguments, same order); only those rows are
  gathered. With ``bucket_lengths`` the cut length is the global batch's (read from its
  ``mask_key`` rows only), so every process feeds arrays of one shape."""
  n = len(next(iter(data.values())))
  for order in batching.batches({"row": np.arange(n)}, batch_size, seed=seed,
                                drop_remainder=drop_remainder):
    idx = order["row"]
    batch = {k: v[idx[rows]] for k, v in data.items()}
    if "weight" in order:  # the filler rows of a kept partial batch
      weight = order["weight"][rows]
      batch["weight"] = weight * (np.asarray(batch["weight"], np.float32)
                                  if "weight" in batch else 1.0)
    if bucket_lengths and mask_key in data:
      length = batching.trim_to_bucket({mask_key: data[mask_key][idx]}, bucket_lengths,
                                       mask_key=mask_key)[mask_key].shape[1]
      batch = batching.trim_to_bucket(batch, (length,), mask_key=mask_key)
    yield batch


def local_batch_placement(mesh: jax.sharding.Mesh, batch_size: int,
                          data_axis: str = "data") -> Callable:
  """``place(local_batch)``: the global ``batch_size``-row arrays, split over ``data_axis``,
  built from this process's rows only (``jax.make_array_from_process_local_data``)."""
  split = NamedSharding(mesh, PartitionSpec(data_axis))
  rows = process_rows(mesh, batch_size, data_axis)
  local = rows.stop - rows.start

  def place(batch):
    for key, value in batch.items():
      if len(value) != local:
        raise ValueError(f"batch[{key!r}] has {len(value)} rows; this process feeds rows "
                         f"{rows.start}:{rows.stop} of the global batch of {batch_size}.")
    return {k: jax.make_array_from_process_local_data(split, np.asarray(v),
                                                      (batch_size,) + np.shape(v)[1:])
            for k, v in batch.items()}

  return place


def global_batch_placement(mesh: jax.sharding.Mesh, data_axis: str = "data") -> Callable:
  """``place(global_batch)``: every process passes the same global batch and places only its
  rows of it (how :func:`jaxrank.batching.batch_placement` feeds a multi-process mesh)."""
  placements = {}

  def place(batch):
    size = len(next(iter(batch.values())))
    if size not in placements:
      placements[size] = (process_rows(mesh, size, data_axis),
                          local_batch_placement(mesh, size, data_axis))
    rows, local_place = placements[size]
    return local_place({k: v[rows] for k, v in batch.items()})

  return place
