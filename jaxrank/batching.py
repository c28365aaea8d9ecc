"""Batches for the reference loop: endless shuffled training batches, padded evaluation
batches, and their placement on a data-parallel mesh.

Example:
  >>> import numpy as np
  >>> from jaxrank import batching
  >>> data = {"x": np.arange(5)}
  >>> next(batching.batches(data, 2, shuffle=False))["x"]
  array([0, 1])
  >>> [b["weight"].tolist() for b in batching.eval_batches(data, 4)]
  [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

Batch = Mapping[str, np.ndarray]


def batches(data: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
            shuffle: bool = True) -> Iterator[dict]:
  """Endless shuffled batches of exactly ``batch_size`` rows (a new order every epoch).

  Each epoch's last partial batch (``len(data) % batch_size`` rows) is dropped, so every
  step sees a full batch; with shuffling a different set of rows is dropped every epoch. For
  evaluation over every row use :func:`eval_batches`.
  """
  n = len(next(iter(data.values())))
  if n < batch_size:
    raise ValueError(f"{n} training examples are fewer than batch_size={batch_size}.")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield {k: v[idx] for k, v in data.items()}


def eval_batches(data: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict]:
  """Every row once, in order; the last batch is padded and marked by ``weight`` 0."""
  n = len(next(iter(data.values())))
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    batch = {k: v[idx] for k, v in data.items()}
    batch["weight"] = valid.astype(np.float32)
    yield batch


def batch_placement(mesh: Optional[jax.sharding.Mesh], data_axis: str = "data",
                    **batch_sizes: int) -> Callable:
  """``place(batch)``: puts a batch's rows split over ``mesh``'s ``data_axis`` (identity
  without a mesh), after checking that every named batch size splits evenly.

  Example:
    >>> import jax, numpy as np
    >>> import jaxrank
    >>> place = batch_placement(jaxrank.data_parallel_mesh(), "data", batch_size=4)
    >>> place({"x": np.zeros((4, 3))})["x"].sharding.spec
    P('data',)
  """
  if mesh is None:
    return lambda batch: batch
  _check_data_mesh(mesh, data_axis)
  shards = mesh.shape[data_axis]
  for name, size in batch_sizes.items():
    if size % shards:
      raise ValueError(
          f"{name} {size} does not split over the {shards} devices of mesh axis "
          f"'{data_axis}': use a multiple of {shards}, or a mesh with fewer devices.")
  split = NamedSharding(mesh, PartitionSpec(data_axis))
  return lambda batch: jax.device_put(batch, split)


def _check_data_mesh(mesh: jax.sharding.Mesh, data_axis: str):
  if data_axis not in mesh.axis_names:
    raise ValueError(f"the mesh has axes {mesh.axis_names}, not the data axis '{data_axis}': "
                     f"pass data_axis= one of them.")
  types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
  if types.get(data_axis) == jax.sharding.AxisType.Explicit:
    raise ValueError(
        f"mesh axis '{data_axis}' is Explicit; data-parallel training needs an Auto axis "
        f"(Hugging Face models index embeddings with sharded ids): use "
        f"jaxrank.data_parallel_mesh(), or jax.make_mesh(shape, names, "
        f"axis_types=(jax.sharding.AxisType.Auto,) * len(names)).")
