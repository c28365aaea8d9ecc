"""A small, readable reference training loop for adapters, with pluggable rank methods.

The loop trains a *trainable* tree next to frozen base weights::

    trainable = {'lora': ..., 'gates': ..., 'head': ...}

* ``lora``/``gates`` are the adapter collections made by :func:`jaxrank.wrap` (absent for the
  frozen-model baseline);
* ``head`` holds the freshly initialised task head (``params`` leaves such as ``classifier``),
  with the same paths as in ``params``. :func:`join` overlays it on the frozen ``params``.

The jitted step takes the frozen variables as an *argument* (never a closed-over constant, so
compilation does not embed 90 MB of weights), computes ``task loss + method penalty``, and
applies one optax update: the method's transform on the adapter collections and AdamW on the
head (:func:`with_head`).

For a loop of your own, :func:`setup` and :func:`make_train_step` are ``fit``'s set-up and step.

``fit(..., mesh=mesh)`` trains data-parallel: every batch is split over the mesh's ``'data'``
axis, variables and optimizer state are replicated, and XLA sums the gradients. On a CPU this
pays even on one machine: split it into one XLA device per core
(``jax.config.update('jax_num_cpu_devices', n)`` right after ``import jax``; the CLI's
``--cpu-devices``), because XLA:CPU runs each batched matmul (attention's) on one core.

What a rank method plugs in is a :class:`jaxrank.Recipe` (:mod:`jaxrank.recipes` builds every
method's, ``jaxrank.recipe("sora", budget_rank=2)``); what a task plugs in is a
:class:`jaxrank.tasks.Task`. Batching lives in :mod:`jaxrank.batching`, the head helpers in
``jaxrank._heads``; both are re-exported here.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, numpy as np, jaxrank
  >>> from jaxrank import recipes, tasks, train
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(2, name="classifier")(nn.tanh(nn.Dense(8, name="body")(x)))
  >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  >>> data = {"x": x, "labels": (x[:, 0] > 0).astype(np.int32)}
  >>> task = tasks.classification_task(
  ...     lambda m, v, b, rngs=None, deterministic=True: m.apply(v, b["x"]))
  >>> result = train.fit(Net(), Net().init(jax.random.key(0), x[:1]), recipes.lora_recipe(rank=2),
  ...                    task, train_data=data, eval_data=data, steps=20, batch_size=16,
  ...                    head=("classifier",), learning_rate=3e-2, progress=False)
  >>> result.rank_pattern
  {'body': 2}
  >>> result.final_metrics["eval_accuracy"] > 0.8
  True
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxrank import _fit_checks
from jaxrank import distributed
from jaxrank import _nonfinite
from jaxrank import _progress
from jaxrank import _recipe
from jaxrank import _tree
from jaxrank import _variables
from jaxrank import _wrap
from jaxrank import tasks
from jaxrank._adapter_export import export_adapter
from jaxrank._evaluation import _init_adapters
from jaxrank._evaluation import _learned_ranks
from jaxrank._evaluation import evaluate
from jaxrank._evaluation import make_eval_step
from jaxrank._evaluation import TrainResult
from jaxrank._fit_checks import NonFiniteError
from jaxrank._heads import HEAD
from jaxrank._heads import join
from jaxrank._heads import split_head
from jaxrank._heads import warmup_linear_schedule
from jaxrank._heads import with_head
from jaxrank._recipe import Recipe
from jaxrank._recipe import RecipeContext
from jaxrank.batching import Batch
from jaxrank.batching import batch_placement
from jaxrank.batching import batches
from jaxrank.batching import eval_batches
from jaxrank.checkpoint import save_train_state as save_checkpoint
from jaxrank.sharding import data_parallel_mesh


# --- the loop -------------------------------------------------------------------------------------
class TrainState(NamedTuple):
  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array


def _wrap_model(base, method: Recipe, default_targets):
  if method.adapter is None:
    return base
  targets = method.targets if method.targets is not None else default_targets
  return _wrap.wrap(base, targets=targets, adapter=method.adapter)


@dataclasses.dataclass
class TrainSetup:
  """Everything :func:`fit` builds before its loop (see :func:`setup`).

  Attributes:
    model: the wrapped model (``base_model`` itself for the frozen baseline).
    frozen: the variables that do not train (the base ``params`` without the head, plus
      method collections such as SaLoRA's multiplier that live outside ``lora``/``gates``).
    state: the initial :class:`TrainState` (its arrays are the step's own copies, safe to
      donate).
    tx: the optax transform of the whole trainable tree (method + head).
    loss_fn: the deterministic task loss ``loss_fn(trainable, batch)`` (see
      :class:`jaxrank.RecipeContext`).
    head_params: the freshly initialised head.
  """

  model: Any
  frozen: dict
  state: TrainState
  tx: optax.GradientTransformation
  loss_fn: Callable
  head_params: dict


def setup(base_model, variables, method: Recipe, task: tasks.Task, *, first_batch: Batch,
          steps: int, learning_rate: float, head_learning_rate: Optional[float] = None,
          head: Sequence[str] = (), targets: Any = "all-linear", seed: int = 0,
          validation_batch: Optional[Batch] = None,
          mesh: Optional[jax.sharding.Mesh] = None,
          head_weight_decay: float = 0.0) -> TrainSetup:
  """Wraps ``base_model``, initialises the adapters and the optimizer: :func:`fit`'s set-up.

  ``first_batch`` fixes the input shapes of ``init``; with ``mesh``, the frozen variables and
  the state are replicated on it. The other arguments are :func:`fit`'s.
  """
  model = _wrap_model(base_model, method, targets)
  key_init, key_train = jax.random.split(jax.random.key(seed))
  params = _tree.plain(variables)["params"]
  if method.adapter is not None:
    init_vars = _init_adapters(model, task, first_batch, key_init)
    full = {**_tree.plain(init_vars), "params": params}
    if method.prepare is not None:
      full = method.prepare(model, full)
  else:
    full = {"params": params}
  body, head_params = split_head(full["params"], head)
  frozen = {**{k: v for k, v in full.items() if k not in _variables.TRAINABLE_COLLECTIONS},
            "params": body}
  trainable = {k: v for k, v in full.items() if k in _variables.TRAINABLE_COLLECTIONS}
  # the step donates its state: never let it alias the caller's arrays
  trainable[HEAD] = jax.tree.map(lambda x: jnp.array(x, copy=True), head_params)

  schedule = warmup_linear_schedule(learning_rate, steps)
  head_schedule = warmup_linear_schedule(head_learning_rate or learning_rate, steps)

  def loss_fn(trainable_, batch):
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    head_leaves = jax.tree.leaves(trainable_.get(HEAD), is_leaf=is_masked)
    if not head_leaves or any(is_masked(x) for x in head_leaves):
      trainable_ = {**trainable_, HEAD: head_params}  # a masked head: use the initial one
    outputs = task.apply(model, join(frozen, trainable_), batch, deterministic=True)
    return task.loss(outputs, batch)

  ctx = RecipeContext(model=model, total_steps=steps, learning_rate=learning_rate,
                      schedule=schedule, loss_fn=loss_fn, validation_batch=validation_batch,
                      num_matrices=(len(_variables.adapter_layers(model, full))
                                    if method.adapter is not None else 0))
  tx = method.optimizer(ctx)
  if method.separate_head:
    tx = with_head(tx, optax.adamw(head_schedule, weight_decay=head_weight_decay))
  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), key_train)
  if mesh is not None:
    frozen, state = distributed.replicate((frozen, state), mesh)  # on every process's devices
  return TrainSetup(model, frozen, state, tx, loss_fn, head_params)


def make_train_step(model, method: Recipe, task: tasks.Task,
                    tx: optax.GradientTransformation, *, deterministic: bool = False) -> Callable:
  """The (unjitted) train step ``step(frozen, state, batch) -> (state, task_loss)``.

  When the loss or a gradient is not finite, or a method transform skipped non-finite values
  (:func:`jaxrank.nonfinite_total`), the step returns ``state`` unchanged and a NaN loss.

  One optax update of ``task loss + method.penalty``: fresh rngs for ``'dropout'`` and the
  method's ``train_rngs`` are split from ``state.rng`` every step. ``deterministic=True``
  switches the model's dropout off. :func:`fit` runs it through :func:`jit_train_step`.
  """
  names = tuple(dict.fromkeys(("dropout",) + tuple(method.train_rngs)))

  def train_step(frozen, state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    rngs = dict(zip(names, jax.random.split(step_rng, len(names))))

    def objective(trainable):
      full_vars = join(frozen, trainable)
      outputs = task.apply(model, full_vars, batch, rngs=rngs, deterministic=deterministic)
      task_loss = task.loss(outputs, batch)
      extra = method.penalty(model, full_vars) if method.penalty is not None else 0.0
      return task_loss + extra, task_loss

    (_, task_loss), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
    updates, opt_state = optax.with_extra_args_support(tx).update(  # the task loss: `value`
        grads, state.opt_state, state.trainable, value=jax.lax.stop_gradient(task_loss))
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = TrainState(state.step + 1, trainable, opt_state, rng)
    # a non-finite loss or gradient, or a method that skipped non-finite scores: keep the
    # state as it was and report NaN, so that no rank decision is ever taken from NaN
    finite = (_nonfinite.all_finite(grads, task_loss)
              & (_nonfinite.nonfinite_total(opt_state)
                 == _nonfinite.nonfinite_total(state.opt_state)))
    return (_nonfinite.select(finite, new_state, state),
            jnp.where(finite, task_loss, jnp.nan))

  return train_step


def jit_train_step(step: Callable, mesh: Optional[jax.sharding.Mesh] = None, *,
                   donate: bool = True) -> Callable:
  """``step`` (from :func:`make_train_step`) jitted as :func:`fit` runs it: the state donated
  and, on ``mesh``, every output replicated (the state stays where :func:`setup` put it)."""
  kwargs = {"donate_argnums": 1} if donate else {}
  if mesh is not None:
    kwargs["out_shardings"] = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, **kwargs)


def fit(
    base_model,
    variables,
    method: Union[Recipe, str],
    task: tasks.Task,
    *,
    train_data: Mapping[str, np.ndarray],
    eval_data: Optional[Mapping[str, np.ndarray]] = None,
    test_data: Optional[Mapping[str, np.ndarray]] = None,
    steps: int = 100,
    batch_size: int = 16,
    eval_batch_size: Optional[int] = None,
    eval_every: int = 0,
    learning_rate: float = 5e-4,
    head_learning_rate: Optional[float] = None,
    head: Sequence[str] = (),
    targets: Any = "all-linear",
    seed: int = 0,
    progress: bool = True,
    on_eval: Optional[Callable[[int, dict, TrainState], None]] = None,
    eval_at_start: bool = False,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: str = "data",
    bucket_lengths: Optional[Sequence[int]] = None,
    drop_remainder: bool = True,
    head_weight_decay: float = 0.0,
) -> TrainResult:
  """Wraps ``base_model`` for ``method``, trains it for ``steps`` and evaluates it.

  Args:
    base_model: a Flax Linen module (e.g. ``hf_model.module``).
    variables: its variables; ``variables['params']`` are the pretrained weights.
    method: the :class:`jaxrank.Recipe` (adapter spec, optimizer, penalty, ...), or a name
      of :data:`jaxrank.recipes.RECIPES` (its defaults at ``total_steps=steps``).
    task: the :class:`jaxrank.tasks.Task` (apply, loss, metrics).
    train_data, eval_data, test_data: dicts of equal-length arrays (one row per example).
    steps, batch_size: optimizer steps and examples per step.
    eval_every: evaluate on ``eval_data`` every so many steps (0: only at the end).
    learning_rate: peak learning rate of the adapters (warmup 6 %, then linear decay).
    head_learning_rate: of the head (defaults to ``learning_rate``).
    head_weight_decay: the head's AdamW weight decay (default 0; the adapters' is the
      recipe's ``weight_decay``).
    head: names of the ``params`` modules that are trained in full (the fresh task head).
    targets: adapter targets when ``method.targets`` is None.
    on_eval: called as ``on_eval(step, record, state)`` after each periodic evaluation (e.g.
      to write a checkpoint).
    eval_at_start: also evaluate before the first step (history entry with ``step`` 0).
    mesh, data_axis: train data-parallel on ``mesh``: every train and eval batch is split over
      its ``data_axis`` (batch sizes must be multiples of its size), variables and optimizer
      state are replicated on it. The axis must be Auto, e.g.
      :func:`jaxrank.data_parallel_mesh` over all devices. For model-parallel layouts place the
      variables yourself (:func:`jaxrank.variable_shardings`) around :func:`setup` and
      :func:`make_train_step`. In a multi-process job (:func:`jaxrank.distributed.initialize`)
      the mesh defaults to :func:`jaxrank.data_parallel_mesh` over every process's devices, and
      each process gathers and places only its rows of every global batch
      (:func:`jaxrank.distributed.local_batches`): call ``fit`` with the same arguments in
      every process.
    bucket_lengths: length bucketing of the training, evaluation and test batches
      (:func:`jaxrank.batching.trim_to_bucket`): each batch's token arrays are cut to the
      smallest of these lengths that holds its longest row, e.g.
      :func:`jaxrank.batching.bucket_lengths`; ``None`` (default): every batch at the data's
      full length.
    drop_remainder: drop each epoch's last partial batch (default), or keep it filled up with
      rows of ``weight`` 0 (:func:`jaxrank.batching.batches`).

  Returns:
    A :class:`TrainResult`: final variables, history (one dict per evaluation, with
    ``step_time_s``: the mean wall time of the steps since the last record that compiled
    nothing, i.e. after the first step of each batch shape; and the ``rank_pattern`` then),
    final metrics (``test_*`` from ``test_data``, else ``eval_data``), rank pattern and
    parameter counts.

  Raises:
    ValueError: for a non-positive ``steps``/``batch_size``, a negative ``eval_every``, or
      eval/test data whose keys or per-example shapes differ from ``train_data``'s.
    jaxrank.NonFiniteError: (a ``FloatingPointError``) when a training loss or an evaluation
      metric is NaN or infinite; it names the step and carries the last finite state
      (``.state``), so no rank decision is taken from NaN.
  """
  start = time.perf_counter()
  if isinstance(method, str):
    from jaxrank import recipes
    method = recipes.recipe(method, total_steps=steps)
  _fit_checks.check_fit_arguments(steps=steps, batch_size=batch_size,
                                  eval_batch_size=eval_batch_size, eval_every=eval_every)
  for name, split in (("eval_data", eval_data), ("test_data", test_data)):
    if split is not None:
      _fit_checks.check_eval_data(train_data, split, name)
  eval_batch_size = eval_batch_size or batch_size
  validation_batch = next(eval_batches(eval_data, batch_size)) if eval_data is not None else None
  if mesh is None and jax.process_count() > 1:  # one process of a multi-process job
    mesh = data_parallel_mesh()
  place = batch_placement(mesh, data_axis, batch_size=batch_size,
                          eval_batch_size=eval_batch_size)
  prepared = setup(base_model, variables, method, task,
                   first_batch=next(batches(train_data, batch_size, seed=seed)), steps=steps,
                   learning_rate=learning_rate, head_learning_rate=head_learning_rate,
                   head=head, targets=targets, seed=seed, validation_batch=validation_batch,
                   mesh=mesh, head_weight_decay=head_weight_decay)
  model, frozen, state = prepared.model, prepared.frozen, prepared.state
  # not donated: the last finite state must survive a step that turns it into NaN
  train_step = jit_train_step(make_train_step(model, method, task, prepared.tx), mesh,
                              donate=False)
  eval_options = dict(mesh=mesh, data_axis=data_axis, bucket_lengths=bucket_lengths)

  eval_step = make_eval_step(model, task)
  history = []
  if eval_at_start and eval_data is not None:
    metrics = evaluate(model, task, frozen, state.trainable, eval_data, eval_batch_size, eval_step,
                       **eval_options)
    _fit_checks.check_metrics(0, metrics, state, history)
    history.append({"step": 0, "train_loss": None, **{f"eval_{k}": v for k, v in metrics.items()}})
  if mesh is not None and jax.process_count() > 1:  # gather and place this process's rows only
    iterator = distributed.local_batches(
        train_data, batch_size, distributed.process_rows(mesh, batch_size, data_axis),
        seed=seed, drop_remainder=drop_remainder, bucket_lengths=bucket_lengths)
    place = distributed.local_batch_placement(mesh, batch_size, data_axis)
  else:
    iterator = batches(train_data, batch_size, seed=seed, drop_remainder=drop_remainder,
                       bucket_lengths=bucket_lengths)
  bar = _progress.Bar(steps, method.name, progress)
  step_times, seen_shapes = [], set()  # steps after compilation, per batch shape
  running = None
  try:
    for step in range(1, steps + 1):
      batch = next(iterator)
      shape = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
      step_start = time.perf_counter()
      new_state, loss = train_step(frozen, state, place(batch))
      loss = float(loss)
      if shape in seen_shapes:
        step_times.append(time.perf_counter() - step_start)
      seen_shapes.add(shape)
      if not np.isfinite(loss):
        # the step was not applied (make_train_step): ``state`` is the one after step - 1
        raise _fit_checks.non_finite_loss(step, loss, state, history)
      state = new_state
      running = loss if running is None else 0.9 * running + 0.1 * loss
      bar.step(running)
      if eval_data is not None and eval_every and step % eval_every == 0 and step < steps:
        metrics = evaluate(model, task, frozen, state.trainable, eval_data, eval_batch_size,
                           eval_step, **eval_options)
        _fit_checks.check_metrics(step, metrics, state, history)
        record = {"step": step, "train_loss": running,
                  **{f"eval_{k}": v for k, v in metrics.items()},
                  **_timing_and_ranks(step_times, model, method, join(frozen, state.trainable),
                                      state.opt_state)}
        step_times = []
        history.append(record)
        if on_eval is not None:
          on_eval(step, record, state)
        bar.record(record)
  finally:
    bar.close()

  trainable = state.trainable
  live_before_finalize = None
  if method.finalize is not None:
    live_before_finalize = _tree.live_rank_total(model, join(frozen, trainable))
    full_vars = method.finalize(model, join(frozen, trainable), state.opt_state)
    _, new_head = split_head(full_vars["params"], head)
    trainable = {**{k: v for k, v in full_vars.items()
                    if k in _variables.TRAINABLE_COLLECTIONS}, HEAD: new_head}
    state = state._replace(trainable=trainable)
  final = {}
  if eval_data is not None:
    metrics = evaluate(model, task, frozen, trainable, eval_data, eval_batch_size, eval_step,
                       **eval_options)
    _fit_checks.check_metrics(steps, metrics, state, history)
    final.update({f"eval_{k}": v for k, v in metrics.items()})
    history.append({"step": steps, "train_loss": running, **final,
                    **_timing_and_ranks(step_times, model, method, join(frozen, trainable),
                                        state.opt_state)})
  if test_data is not None:
    metrics = evaluate(model, task, frozen, trainable, test_data, eval_batch_size, eval_step,
                       **eval_options)
    _fit_checks.check_metrics(steps, metrics, state, history, split="test")
    final.update({f"test_{k}": v for k, v in metrics.items()})
  variables_out = join(frozen, trainable)
  pattern, adapter_count = _learned_ranks(model, method, variables_out, state.opt_state)
  head_count = int(sum(np.size(x) for x in jax.tree.leaves(trainable[HEAD])))
  return TrainResult(
      model=model, variables=variables_out, state=state, method=method, history=history,
      final_metrics=final, rank_pattern=pattern, trainable_parameters=adapter_count,
      head_parameters=head_count, wall_time=time.perf_counter() - start,
      live_ranks_before_finalize=live_before_finalize)


def _timing_and_ranks(step_times, model, method, variables, opt_state) -> dict:
  """A history record's ``step_time_s`` (mean of ``step_times``, None when empty) and
  ``rank_pattern`` (the method's live ranks now; absent without adapters)."""
  extra = {"step_time_s": float(np.mean(step_times)) if step_times else None}
  if method.adapter is not None:
    extra["rank_pattern"] = _learned_ranks(model, method, variables, opt_state)[0]
  return extra


# --- the 0.1 spellings of what moved out, for one release ---------------------------------------
_MOVED = {
    "Method": (_recipe.Recipe, "jaxrank.Recipe"),
    "MethodContext": (_recipe.RecipeContext, "jaxrank.RecipeContext"),
    "lora_method": (_recipe.lora, "jaxrank.recipes.lora_recipe"),
    "frozen_method": (_recipe.frozen, "jaxrank.recipes.frozen_recipe"),
    **{name: (getattr(tasks, name), f"jaxrank.tasks.{name}")
       for name in ("Task", "classification_loss", "classification_metrics",
                    "summarize_classification", "causal_lm_loss", "causal_lm_metrics",
                    "summarize_causal_lm")},
}


def __getattr__(name: str):
  """``train.Method``, ``train.Task``, ... (moved in 0.2) still work and warn (PEP 562)."""
  if name not in _MOVED:
    raise AttributeError(f"module 'jaxrank.train' has no attribute {name!r}")
  value, new = _MOVED[name]
  warnings.warn(f"jaxrank.train.{name} is deprecated; use {new}.", DeprecationWarning,
                stacklevel=2)
  return value
