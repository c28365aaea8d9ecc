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

A :class:`Method` is what a rank method plugs in: the adapter spec, a builder of its optax
transform, an extra loss term, optional variable preparation/finalisation and a way to read
the learned rank pattern. :func:`lora_method` and :func:`frozen_method` are the two reference
methods; ``jaxrank.cli`` builds the others.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, numpy as np, jaxrank
  >>> from jaxrank import train
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(2, name="classifier")(nn.tanh(nn.Dense(8, name="body")(x)))
  >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  >>> data = {"x": x, "labels": (x[:, 0] > 0).astype(np.int32)}
  >>> task = train.Task(apply=lambda m, v, b, rngs=None, deterministic=True: m.apply(v, b["x"]),
  ...                   loss=train.classification_loss, metrics=train.classification_metrics,
  ...                   summarize=train.summarize_classification)
  >>> result = train.fit(Net(), Net().init(jax.random.key(0), x[:1]), train.lora_method(rank=2),
  ...                    task, train_data=data, eval_data=data, steps=20, batch_size=16,
  ...                    head=("classifier",), learning_rate=3e-2, progress=False)
  >>> result.rank_pattern
  {'body': 2}
  >>> result.final_metrics["eval_accuracy"] > 0.8
  True
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxrank import _adapter
from jaxrank import _variables
from jaxrank import _wrap

Batch = Mapping[str, np.ndarray]
HEAD = "head"


# --- the method plug-in -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What a method's optimizer builder may use.

  Attributes:
    model: the wrapped model.
    total_steps: optimizer steps of the run.
    learning_rate: the peak learning rate (the schedule is ``schedule``).
    schedule: the learning-rate schedule (linear warmup, then linear decay).
    loss_fn: ``loss_fn(trainable, batch) -> scalar``, the deterministic task loss with the
      frozen variables closed over (for methods that score ranks by forward passes, e.g.
      ALoRA; inside the step prefer the penalty hook). The head inside ``trainable`` may be a
      masked node (see :func:`with_head`); then the initial head is used.
    validation_batch: one fixed batch of the validation split (ALoRA's scoring batch).
    num_matrices: the number of adapted matrices.
  """

  model: Any
  total_steps: int
  learning_rate: float
  schedule: optax.Schedule
  loss_fn: Callable
  validation_batch: Optional[Batch] = None
  num_matrices: int = 0


@dataclasses.dataclass(frozen=True)
class Method:
  """A rank method as the training loop sees it.

  Attributes:
    name: shown in logs and tables.
    adapter: the adapter spec given to :func:`jaxrank.wrap` (``None``: no adapters, only the
      head trains; the frozen-model baseline).
    optimizer: ``optimizer(ctx) -> optax.GradientTransformation``. With ``separate_head``
      (default) it sees ``{'lora', 'gates'}`` and the head gets its own AdamW
      (:func:`with_head`); otherwise it updates the whole trainable tree, head included (use
      that when the transform needs the live head, e.g. ALoRA's scoring ``ctx.loss_fn``).
    penalty: ``penalty(model, variables) -> scalar`` added to the task loss (e.g. AdaLoRA's
      orthogonality term, SaLoRA's Lagrangian), or ``None``.
    prepare: ``prepare(model, variables) -> variables`` after ``init`` (e.g. adding SaLoRA's
      Lagrange multiplier), or ``None``.
    finalize: ``finalize(model, variables, opt_state) -> variables`` after training (e.g.
      hardening SaLoRA's gates) before evaluation and export, or ``None``.
    rank_pattern: ``rank_pattern(model, variables, opt_state) -> {path: rank}``; by default
      :func:`jaxrank.rank_pattern` (the live ranks of the deterministic gates).
    train_rngs: rng streams passed to ``apply`` in training steps (``'dropout'`` always).
    targets: which layers get adapters (``None``: the caller's default).
    separate_head: see ``optimizer``.
  """

  name: str
  adapter: Optional[_adapter.LoRA]
  optimizer: Callable[[MethodContext], optax.GradientTransformation]
  penalty: Optional[Callable[[Any, Any], jax.Array]] = None
  prepare: Optional[Callable[[Any, Any], Any]] = None
  finalize: Optional[Callable[[Any, Any, Any], Any]] = None
  rank_pattern: Optional[Callable[[Any, Any, Any], dict]] = None
  train_rngs: tuple[str, ...] = ("dropout",)
  targets: Any = None
  separate_head: bool = True


def lora_method(rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                weight_decay: float = 0.0) -> Method:
  """Plain LoRA (Hu et al., 2021) with AdamW on the factors; ``alpha`` defaults to ``2·rank``."""
  adapter = _adapter.LoRA(rank=rank, alpha=float(2 * rank if alpha is None else alpha),
                          dropout=dropout)
  return Method(
      name="lora", adapter=adapter,
      optimizer=lambda ctx: optax.adamw(ctx.schedule, weight_decay=weight_decay))


def frozen_method() -> Method:
  """The frozen-model baseline: no adapters, only the task head trains."""
  return Method(name="frozen", adapter=None, optimizer=lambda ctx: optax.identity())


# --- the task plug-in -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
  """How to run the model on a batch and score it.

  Attributes:
    apply: ``apply(model, variables, batch, *, rngs=None, deterministic=True) -> outputs``.
    loss: ``loss(outputs, batch) -> scalar`` (mean over the batch's weighted examples).
    metrics: ``metrics(outputs, batch) -> {name: sum}`` additive over batches.
    summarize: ``summarize(sums) -> {name: value}`` (e.g. accuracy, perplexity).
  """

  apply: Callable
  loss: Callable
  metrics: Callable
  summarize: Callable


def _weights(batch, n):
  return batch["weight"] if "weight" in batch else jnp.ones((n,), jnp.float32)


def _logits(outputs):
  if hasattr(outputs, "logits"):
    return outputs.logits
  return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def classification_loss(outputs, batch):
  """Mean cross-entropy over the (weighted) examples."""
  logits = _logits(outputs).astype(jnp.float32)
  w = _weights(batch, logits.shape[0])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_metrics(outputs, batch):
  logits = _logits(outputs).astype(jnp.float32)
  w = _weights(batch, logits.shape[0])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
  return {"loss": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}


def summarize_classification(sums):
  count = max(float(sums["count"]), 1.0)
  return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


def causal_lm_loss(outputs, batch):
  """Mean next-token cross-entropy over the non-padding target tokens."""
  nll, tokens = _next_token_nll(outputs, batch)
  return jnp.sum(nll) / jnp.maximum(tokens, 1.0)


def _next_token_nll(outputs, batch):
  logits = _logits(outputs)[:, :-1].astype(jnp.float32)
  targets = batch["input_ids"][:, 1:]
  mask = batch["attention_mask"][:, 1:].astype(jnp.float32)
  mask = mask * _weights(batch, logits.shape[0])[:, None]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask
  return nll, jnp.sum(mask)


def causal_lm_metrics(outputs, batch):
  nll, tokens = _next_token_nll(outputs, batch)
  return {"nll": jnp.sum(nll), "tokens": tokens}


def summarize_causal_lm(sums):
  nll = float(sums["nll"]) / max(float(sums["tokens"]), 1.0)
  return {"loss": nll, "perplexity": math.exp(min(nll, 50.0))}


# --- trainable tree helpers -----------------------------------------------------------------
def split_head(params, head: Sequence[str]) -> tuple[dict, dict]:
  """Splits ``params`` into ``(body, head)``: head leaves have a path element in ``head``."""
  flat = traverse_util.flatten_dict(_variables._plain(params))
  is_head = lambda path: any(name in head for name in path)
  body = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_head(k)})
  head_params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_head(k)})
  return body, head_params


def join(frozen, trainable) -> dict:
  """Full variables from ``frozen`` and ``trainable`` (the head overlaid on ``params``)."""
  variables = dict(_variables._plain(frozen))
  head = trainable.get(HEAD) if isinstance(trainable, Mapping) else None
  if isinstance(head, Mapping) and head:
    flat = traverse_util.flatten_dict(_variables._plain(variables["params"]))
    # inside optax.partition the head's leaves may be MaskedNodes: keep the frozen copy then
    flat.update({k: v for k, v in traverse_util.flatten_dict(_variables._plain(head)).items()
                 if not isinstance(v, optax.MaskedNode)})
    variables["params"] = traverse_util.unflatten_dict(flat)
  for collection, tree in trainable.items():
    if collection != HEAD:
      variables[collection] = tree
  return variables


def with_head(method_tx: optax.GradientTransformation,
              head_tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``method_tx`` on ``{'lora', 'gates'}`` and ``head_tx`` on ``trainable['head']``.

  Inside ``method_tx`` the head is an ``optax.MaskedNode`` (a pytree without leaves).
  """
  labels = lambda tree: {k: jax.tree.map(lambda _, k=k: HEAD if k == HEAD else "adapter", v)
                         for k, v in tree.items()}
  return optax.with_extra_args_support(
      optax.partition({HEAD: head_tx, "adapter": method_tx}, labels))


def warmup_linear_schedule(learning_rate: float, total_steps: int,
                           warmup_fraction: float = 0.06) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then linear decay to zero (the GLUE recipe)."""
  warmup = max(1, int(total_steps * warmup_fraction))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup),
       optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))], [warmup])


# --- data iteration -----------------------------------------------------------------------------
def batches(data: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
            shuffle: bool = True) -> Iterator[dict]:
  """Endless shuffled batches of exactly ``batch_size`` rows (a new order every epoch)."""
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


# --- the loop -------------------------------------------------------------------------------------
class TrainState(NamedTuple):
  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass
class TrainResult:
  """What :func:`fit` returns."""

  model: Any
  variables: dict
  state: TrainState
  method: Method
  history: list
  final_metrics: dict
  rank_pattern: dict
  trainable_parameters: int
  head_parameters: int
  wall_time: float
  # total live ranks after training but before ``method.finalize`` (None without finalize)
  live_ranks_before_finalize: Optional[int] = None


def _wrap_model(base, method: Method, default_targets):
  if method.adapter is None:
    return base
  targets = method.targets if method.targets is not None else default_targets
  return _wrap.wrap(base, targets=targets, adapter=method.adapter)


def evaluate(model, task: Task, frozen, trainable, data, batch_size: int, _fn=None, *,
             mesh: Optional[jax.sharding.Mesh] = None, data_axis: str = "data") -> dict:
  """``task.summarize`` of the summed metrics over every example of ``data``.

  With ``mesh``, each batch is split over its ``data_axis`` (see :func:`fit`).
  """
  fn = _fn or make_eval_step(model, task)
  place = batch_placement(mesh, data_axis, eval_batch_size=batch_size)
  sums = None
  for batch in eval_batches(data, batch_size):
    out = fn(frozen, trainable, place(batch))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return task.summarize(jax.device_get(sums))


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


def make_eval_step(model, task: Task):
  @jax.jit
  def eval_step(frozen, trainable, batch):
    outputs = task.apply(model, join(frozen, trainable), batch, deterministic=True)
    return task.metrics(outputs, batch)
  return eval_step


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
    loss_fn: the deterministic task loss ``loss_fn(trainable, batch)`` (:class:`MethodContext`).
    head_params: the freshly initialised head.
  """

  model: Any
  frozen: dict
  state: TrainState
  tx: optax.GradientTransformation
  loss_fn: Callable
  head_params: dict


def setup(base_model, variables, method: Method, task: Task, *, first_batch: Batch,
          steps: int, learning_rate: float, head_learning_rate: Optional[float] = None,
          head: Sequence[str] = (), targets: Any = "all-linear", seed: int = 0,
          validation_batch: Optional[Batch] = None,
          mesh: Optional[jax.sharding.Mesh] = None) -> TrainSetup:
  """Wraps ``base_model``, initialises the adapters and the optimizer: :func:`fit`'s set-up.

  ``first_batch`` fixes the input shapes of ``init``; with ``mesh``, the frozen variables and
  the state are replicated on it. The other arguments are :func:`fit`'s.
  """
  model = _wrap_model(base_model, method, targets)
  key_init, key_train = jax.random.split(jax.random.key(seed))
  params = _variables._plain(variables)["params"]
  if method.adapter is not None:
    init_vars = _init_adapters(model, task, first_batch, key_init)
    full = {**_variables._plain(init_vars), "params": params}
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

  ctx = MethodContext(model=model, total_steps=steps, learning_rate=learning_rate,
                      schedule=schedule, loss_fn=loss_fn, validation_batch=validation_batch,
                      num_matrices=(len(_variables.adapter_layers(model, full))
                                    if method.adapter is not None else 0))
  tx = method.optimizer(ctx)
  if method.separate_head:
    tx = with_head(tx, optax.adamw(head_schedule, weight_decay=0.0))
  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), key_train)
  if mesh is not None:
    frozen, state = jax.device_put((frozen, state), NamedSharding(mesh, PartitionSpec()))
  return TrainSetup(model, frozen, state, tx, loss_fn, head_params)


def make_train_step(model, method: Method, task: Task, tx: optax.GradientTransformation, *,
                    deterministic: bool = False) -> Callable:
  """The (unjitted) train step ``step(frozen, state, batch) -> (state, task_loss)``.

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
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return TrainState(state.step + 1, trainable, opt_state, rng), task_loss

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
    method: Method,
    task: Task,
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
) -> TrainResult:
  """Wraps ``base_model`` for ``method``, trains it for ``steps`` and evaluates it.

  Args:
    base_model: a Flax Linen module (e.g. ``hf_model.module``).
    variables: its variables; ``variables['params']`` are the pretrained weights.
    method: the :class:`Method` (adapter spec, optimizer, penalty, ...).
    task: the :class:`Task` (apply, loss, metrics).
    train_data, eval_data, test_data: dicts of equal-length arrays (one row per example).
    steps, batch_size: optimizer steps and examples per step.
    eval_every: evaluate on ``eval_data`` every so many steps (0: only at the end).
    learning_rate: peak learning rate of the adapters (warmup 6 %, then linear decay).
    head_learning_rate: of the head (defaults to ``learning_rate``).
    head: names of the ``params`` modules that are trained in full (the fresh task head).
    targets: adapter targets when ``method.targets`` is None.
    on_eval: called as ``on_eval(step, record, state)`` after each periodic evaluation (e.g.
      to write a checkpoint). The next step donates ``state``'s buffers: copy what you keep.
    eval_at_start: also evaluate before the first step (history entry with ``step`` 0).
    mesh, data_axis: train data-parallel on ``mesh``: every train and eval batch is split over
      its ``data_axis`` (batch sizes must be multiples of its size), variables and optimizer
      state are replicated on it. The axis must be Auto, e.g.
      :func:`jaxrank.data_parallel_mesh` over all devices. For model-parallel layouts place the
      variables yourself (:func:`jaxrank.variable_shardings`) around :func:`setup` and
      :func:`make_train_step`.

  Returns:
    A :class:`TrainResult`: final variables, history (one dict per evaluation), final metrics
    (``test_*`` from ``test_data``, else ``eval_data``), rank pattern and parameter counts.
  """
  start = time.perf_counter()
  eval_batch_size = eval_batch_size or batch_size
  validation_batch = next(eval_batches(eval_data, batch_size)) if eval_data is not None else None
  place = batch_placement(mesh, data_axis, batch_size=batch_size,
                          eval_batch_size=eval_batch_size)
  prepared = setup(base_model, variables, method, task,
                   first_batch=next(batches(train_data, batch_size, seed=seed)), steps=steps,
                   learning_rate=learning_rate, head_learning_rate=head_learning_rate,
                   head=head, targets=targets, seed=seed, validation_batch=validation_batch,
                   mesh=mesh)
  model, frozen, state = prepared.model, prepared.frozen, prepared.state
  train_step = jit_train_step(make_train_step(model, method, task, prepared.tx), mesh)
  on_mesh = dict(mesh=mesh, data_axis=data_axis)

  eval_step = make_eval_step(model, task)
  history = []
  if eval_at_start and eval_data is not None:
    metrics = evaluate(model, task, frozen, state.trainable, eval_data, eval_batch_size, eval_step,
                       **on_mesh)
    history.append({"step": 0, "train_loss": None, **{f"eval_{k}": v for k, v in metrics.items()}})
  iterator = batches(train_data, batch_size, seed=seed)
  bar = _progress(steps, method.name, progress)
  running = None
  for step in range(1, steps + 1):
    state, loss = train_step(frozen, state, place(next(iterator)))
    loss = float(loss)
    running = loss if running is None else 0.9 * running + 0.1 * loss
    bar.update(1)
    if bar.__class__.__name__ == "tqdm":
      bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    if eval_data is not None and eval_every and step % eval_every == 0 and step < steps:
      metrics = evaluate(model, task, frozen, state.trainable, eval_data, eval_batch_size,
                         eval_step, **on_mesh)
      record = {"step": step, "train_loss": running,
                **{f"eval_{k}": v for k, v in metrics.items()}}
      history.append(record)
      if on_eval is not None:
        on_eval(step, record, state)
      if bar.__class__.__name__ == "tqdm":
        bar.write(_format_record(record))
  bar.close()

  trainable = state.trainable
  live_before_finalize = None
  if method.finalize is not None:
    live_before_finalize = int(sum(
        np.sum(np.asarray(m)) for m in _variables.rank_masks(model, join(frozen, trainable)).values()))
    full_vars = method.finalize(model, join(frozen, trainable), state.opt_state)
    _, new_head = split_head(full_vars["params"], head)
    trainable = {**{k: v for k, v in full_vars.items()
                    if k in _variables.TRAINABLE_COLLECTIONS}, HEAD: new_head}
    state = state._replace(trainable=trainable)
  final = {}
  if eval_data is not None:
    metrics = evaluate(model, task, frozen, trainable, eval_data, eval_batch_size, eval_step,
                       **on_mesh)
    final.update({f"eval_{k}": v for k, v in metrics.items()})
    history.append({"step": steps, "train_loss": running, **final})
  if test_data is not None:
    metrics = evaluate(model, task, frozen, trainable, test_data, eval_batch_size, eval_step,
                       **on_mesh)
    final.update({f"test_{k}": v for k, v in metrics.items()})
  variables_out = join(frozen, trainable)
  if method.adapter is None:
    pattern, adapter_count = {}, 0
  else:
    pattern = (method.rank_pattern(model, variables_out, state.opt_state)
               if method.rank_pattern is not None
               else _variables.rank_pattern(model, variables_out))
    pattern = {k: (int(np.sum(v)) if np.ndim(v) and np.asarray(v).dtype == bool else v)
               for k, v in pattern.items()}
    adapter_count = _variables.effective_parameter_count(model, variables_out)
  head_count = int(sum(np.size(x) for x in jax.tree.leaves(trainable[HEAD])))
  return TrainResult(
      model=model, variables=variables_out, state=state, method=method, history=history,
      final_metrics=final, rank_pattern=pattern, trainable_parameters=adapter_count,
      head_parameters=head_count, wall_time=time.perf_counter() - start,
      live_ranks_before_finalize=live_before_finalize)


def _init_adapters(model, task: Task, batch, key):
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


def _format_record(record: dict) -> str:
  parts = [f"step {record['step']}"]
  for k, v in record.items():
    if k != "step" and isinstance(v, float):
      parts.append(f"{k} {v:.4f}")
  return "  ".join(parts)


class _NoBar:
  def update(self, n):
    pass

  def write(self, s):
    pass

  def close(self):
    pass


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# --- checkpoints and export -------------------------------------------------------------------
def save_checkpoint(directory, state: TrainState, *, max_to_keep: Optional[int] = 3) -> str:
  """Saves the whole train state (step, trainable tree, optimizer state, rng) with orbax.

  Uses :mod:`jaxrank.checkpoint` (one sub-folder per step, the newest ``max_to_keep`` kept).
  Restore with ``jaxrank.checkpoint.restore(directory, target)`` where ``target`` is a
  :class:`TrainState` of the same structure (e.g. the one :func:`fit` returns).
  """
  from pathlib import Path
  from jaxrank import checkpoint
  path = Path(directory).absolute()
  checkpoint.save(path, int(state.step), state, max_to_keep=max_to_keep)
  return str(path)


def export_adapter(result: TrainResult, directory, *, extra_config: Optional[dict] = None):
  """Writes the trained adapter, pruned to its live ranks, to ``directory``.

  * ``adapter.safetensors``: the plain-LoRA factors of :func:`jaxrank.compact` (gates and
    scale folded into ``B``, dead ranks dropped) under ``lora/<path>/A|B`` and the task head
    under ``head/<path>``;
  * ``adapter_config.json``: method, rank per layer, scale, parameter counts;
  * ``peft/``: the same adapter in PEFT's format (``jaxrank.save_peft_adapter``), when the
    model's layer paths are PyTorch module names (Hugging Face models).

  Returns the directory. The frozen-model baseline writes only the head.
  """
  import json
  from pathlib import Path
  from safetensors.numpy import save_file
  from jaxrank import export
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  config = {"method": result.method.name, "rank_pattern": {}, "scale": None}
  if result.method.adapter is not None:
    lora_model, lora_vars, pattern = export.compact(result.model, result.variables)
    for key, value in traverse_util.flatten_dict(_variables._plain(lora_vars["lora"])).items():
      tensors["lora/" + "/".join(key)] = np.asarray(value)
    config.update(rank_pattern=pattern, scale=float(lora_model.adapter.scale),
                  alpha=float(lora_model.adapter.alpha), rank=int(lora_model.adapter.rank),
                  effective_parameters=int(sum(np.size(v) for k, v in tensors.items())))
  head = result.state.trainable.get(HEAD, {})
  for key, value in traverse_util.flatten_dict(_variables._plain(head)).items():
    tensors["head/" + "/".join(key)] = np.asarray(value)
  config["head_parameters"] = result.head_parameters
  config.update(extra_config or {})
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(directory / "adapter.safetensors"))
  if result.method.adapter is not None and any(result.rank_pattern.values()):
    from jaxrank import peft_io
    peft_io.save_peft_adapter(directory / "peft", result.model, result.variables)
  (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return directory
