"""Batches for the reference loop: endless shuffled training batches, padded evaluation
batches, length bucketing, and their placement on a data-parallel mesh.

Length bucketing: token arrays are stored padded to one maximum length; with
``bucket_lengths`` (e.g. :func:`bucket_lengths`: 16, 24, 32, 48, 64, ... up to the maximum) each batch
is cut to the smallest bucket that holds its longest row (by ``attention_mask``), so a jitted
step compiles a handful of shapes and short texts cost less. Only right padding is cut, which
the attention mask already hides: results equal fixed padding up to floating-point rounding.

Example:
  >>> import numpy as np
  >>> from jaxrank import batching
  >>> data = {"x": np.arange(5)}
  >>> next(batching.batches(data, 2, shuffle=False))["x"]
  array([0, 1])
  >>> [b["weight"].tolist() for b in batching.eval_batches(data, 4)]
  [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
  >>> batching.bucket_lengths(64)
  (16, 24, 32, 48, 64)
  >>> tokens = {"input_ids": np.ones((2, 64), np.int32),
  ...           "attention_mask": np.array([[1] * 20 + [0] * 44, [1] * 5 + [0] * 59])}
  >>> batching.trim_to_bucket(tokens, (16, 24, 32, 48, 64))["input_ids"].shape
  (2, 24)
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

Batch = Mapping[str, np.ndarray]


def bucket_lengths(max_length: int, minimum: int = 16) -> tuple[int, ...]:
  """The powers of two and their 1.5 multiples (16, 24, 32, 48, 64, 96, ...) from ``minimum``
  below ``max_length``, then ``max_length`` itself: a batch pads at most 50 % past its longest
  row, and a jitted step compiles about two shapes per doubling of the length.

  >>> bucket_lengths(100), bucket_lengths(8)
  ((16, 24, 32, 48, 64, 96, 100), (8,))
  """
  if max_length < 1 or minimum < 1:
    raise ValueError(f"bucket lengths need max_length >= 1 and minimum >= 1, got "
                     f"{max_length} and {minimum}.")
  lengths, power = [], 1
  while power < max_length:
    lengths += [n for n in (power, power * 3 // 2) if minimum <= n < max_length and n > 1]
    power *= 2
  return tuple(sorted(set(lengths))) + (max_length,)


def trim_to_bucket(batch: Mapping[str, np.ndarray], lengths: Optional[Sequence[int]], *,
                   mask_key: str = "attention_mask") -> dict:
  """``batch`` with its token arrays cut to the smallest of ``lengths`` that holds every row's
  last unmasked token (``lengths`` None or no ``mask_key``: unchanged).

  Token arrays are those whose second axis has the length of ``batch[mask_key]``; the cut
  removes only positions past the last 1 of every row's mask.
  """
  if not lengths or mask_key not in batch or np.ndim(batch[mask_key]) != 2:
    return dict(batch)
  mask = np.asarray(batch[mask_key])
  full = mask.shape[1]
  columns = np.nonzero(mask.any(axis=0))[0]
  used = int(columns[-1]) + 1 if columns.size else 1
  length = min([n for n in lengths if used <= n <= full] or [full])
  if length == full:
    return dict(batch)
  return {k: (v[:, :length] if np.ndim(v) >= 2 and np.shape(v)[1] == full else v)
          for k, v in batch.items()}


def batches(data: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
            shuffle: bool = True, drop_remainder: bool = True,
            bucket_lengths: Optional[Sequence[int]] = None) -> Iterator[dict]:
  """Endless shuffled batches of exactly ``batch_size`` rows (a new order every epoch).

  With ``drop_remainder`` (default) each epoch's last partial batch
  (``len(data) % batch_size`` rows) is dropped, so every step sees a full batch; with
  shuffling a different set of rows is dropped every epoch. With ``drop_remainder=False`` the
  partial batch is kept, filled up to ``batch_size`` with rows of ``weight`` 0 (every batch
  then carries ``weight``; the losses of :mod:`jaxrank.tasks` honour it), so every row is seen
  once per epoch. ``bucket_lengths``: see :func:`trim_to_bucket`. For evaluation over every
  row use :func:`eval_batches`.
  """
  n = len(next(iter(data.values())))
  if n < batch_size:
    raise ValueError(f"{n} training examples are fewer than batch_size={batch_size}.")
  rng = np.random.default_rng(seed)
  last = n - batch_size + 1 if drop_remainder else n
  while True:
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, last, batch_size):
      idx = order[start:start + batch_size]
      batch = {k: v[idx] for k, v in data.items()}
      if not drop_remainder:
        batch = _fill_with_weight_zero(data, batch, idx, batch_size)
      yield trim_to_bucket(batch, bucket_lengths)


def _fill_with_weight_zero(data, batch, idx, batch_size):
  weight = np.asarray(data.get("weight", np.ones(len(next(iter(data.values()))))),
                      np.float32)[idx]
  missing = batch_size - len(idx)
  if missing:
    filler = np.full(missing, idx[0])
    batch = {k: np.concatenate([v, data[k][filler]]) for k, v in batch.items()}
    weight = np.concatenate([weight, np.zeros(missing, np.float32)])
  batch["weight"] = weight
  return batch


def eval_batches(data: Mapping[str, np.ndarray], batch_size: int, *,
                 bucket_lengths: Optional[Sequence[int]] = None) -> Iterator[dict]:
  """Every row once, in order; the last batch is padded and marked by ``weight`` 0.

  ``bucket_lengths``: see :func:`trim_to_bucket`.
  """
  n = len(next(iter(data.values())))
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    batch = {k: v[idx] for k, v in data.items()}
    batch["weight"] = valid.astype(np.float32)
    yield trim_to_bucket(batch, bucket_lengths)


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
  if jax.process_count() > 1:  # one process of a multi-process job: place only its rows
    from jaxrank import distributed
    return distributed.global_batch_placement(mesh, data_axis)
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
