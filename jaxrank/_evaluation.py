"""Results and evaluation for the reference loop: :class:`TrainResult`, the jitted metric step,
whole-split evaluation, the learned rank pattern that :func:`jaxrank.train.fit` reports and
the adapters' ``init`` through a task (all re-exported by ``jaxrank.train``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _variables
from jaxrank import tasks
from jaxrank._heads import join
from jaxrank._recipe import Recipe
from jaxrank.batching import batch_placement
from jaxrank.batching import eval_batches


@dataclasses.dataclass
class TrainResult:
  """What :func:`fit` returns."""

  model: Any
  variables: dict
  state: TrainState
  method: Recipe
  history: list
  final_metrics: dict
  rank_pattern: dict
  trainable_parameters: int
  head_parameters: int
  wall_time: float
  # total live ranks after training but before ``method.finalize`` (None without finalize)
  live_ranks_before_finalize: Optional[int] = None


def evaluate(model, task: tasks.Task, frozen, trainable, data, batch_size: int, _fn=None, *,
             mesh: Optional[jax.sharding.Mesh] = None, data_axis: str = "data",
             bucket_lengths: Optional[Sequence[int]] = None) -> dict:
  """``task.summarize`` of the summed metrics over every example of ``data``.

  With ``mesh``, each batch is split over its ``data_axis`` (see :func:`fit`). With
  ``bucket_lengths``, each batch's token arrays are cut to the smallest bucket that holds its
  longest row (:func:`jaxrank.batching.trim_to_bucket`), as :func:`fit` does for training:
  only masked right padding is cut, so the metrics equal fixed padding's up to float rounding.
  """
  fn = _fn or make_eval_step(model, task)
  place = batch_placement(mesh, data_axis, eval_batch_size=batch_size)
  sums = None
  for batch in eval_batches(data, batch_size, bucket_lengths=bucket_lengths):
    out = fn(frozen, trainable, place(batch))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return task.summarize(jax.device_get(sums))


def make_eval_step(model, task: tasks.Task):
  @jax.jit
  def eval_step(frozen, trainable, batch):
    outputs = task.apply(model, join(frozen, trainable), batch, deterministic=True)
    return task.metrics(outputs, batch)
  return eval_step


def _learned_ranks(model, method: Recipe, variables, opt_state) -> tuple[dict, int]:
  """``(rank pattern, live adapter parameters)`` after training (empty without adapters)."""
  if method.adapter is None:
    return {}, 0
  pattern = (method.rank_pattern(model, variables, opt_state)
             if method.rank_pattern is not None else _variables.rank_pattern(model, variables))
  pattern = {k: (int(np.sum(v)) if np.ndim(v) and np.asarray(v).dtype == bool else v)
             for k, v in pattern.items()}
  return pattern, _variables.effective_parameter_count(model, variables)


def _init_adapters(model, task: tasks.Task, batch, key):
  """``model.init`` through ``task.apply`` (so the task decides the call signature)."""
  captured = {}

  class _Init:
    def apply(self, variables, *args, **kwargs):
      del variables
      captured["variables"] = model.init(
          key, *args, **{k: v for k, v in kwargs.items() if k != "rngs"})
      return captured["variables"]

  def init(b):
    task.apply(_Init(), None, b, deterministic=True)
    return captured["variables"]

  return jax.jit(init)({k: v[:1] for k, v in batch.items()})
