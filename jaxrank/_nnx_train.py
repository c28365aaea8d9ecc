"""``jaxrank.nnx.fit``: the core of :func:`jaxrank.train.fit` for an ``nnx.Module``.

The model is adapted in place with the recipe's adapter (:func:`jaxrank.nnx.wrap`), the
recipe's transform goes through :func:`jaxrank.nnx.transform` into
``nnx.Optimizer(model, tx, wrt=jaxrank.nnx.TRAINABLE)``, and one ``nnx.jit`` step minimises
``task loss + recipe.penalty`` (the penalty reads :func:`jaxrank.nnx.to_linen_variables`). The
base ``nnx.Param`` never trains: the filter leaves it out of the gradient and the optimizer.

An NNX task is a :class:`jaxrank.tasks.Task` whose ``apply`` takes the model itself:
``apply(model, batch) -> outputs`` (no variables; dropout and hard-concrete noise come from
:func:`jaxrank.nnx.rngs`). ``loss``/``metrics``/``summarize`` are the Linen task's, e.g.
:func:`jaxrank.models.llama_nnx.causal_lm_task`.

Not covered (use :func:`jaxrank.train.fit` on Linen for these): a separately trained task
head, meshes, periodic evaluation callbacks. For checkpoints and resuming, write the loop
with :func:`setup` and :func:`jaxrank.nnx.save_checkpoint`/:func:`jaxrank.nnx.restore_checkpoint`.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from flax import nnx
  >>> import jaxrank
  >>> from jaxrank import tasks
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.body = nnx.Linear(4, 8, rngs=rngs)
  ...     self.out = nnx.Linear(8, 2, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.out(jnp.tanh(self.body(x)))
  >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  >>> data = {"x": x, "labels": (x[:, 0] > 0).astype(np.int32)}
  >>> task = tasks.classification_task(lambda model, batch: model(batch["x"]))
  >>> result = jaxrank.nnx.fit(Net(nnx.Rngs(0)), "sora", task, train_data=data,
  ...                          eval_data=data, steps=20, batch_size=16, targets=["body"],
  ...                          learning_rate=3e-2, progress=False)
  >>> result.rank_pattern  # SoRA's budget: 4 of 8 ranks
  {'body': 4}
  >>> result.losses[-1] < result.losses[0]
  True
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrank import _nnx_layers
from jaxrank import _progress
from jaxrank import _tree
from jaxrank import tasks as _tasks
from jaxrank._heads import warmup_linear_schedule
from jaxrank._recipe import Recipe
from jaxrank._recipe import RecipeContext
from jaxrank.batching import batches
from jaxrank.batching import eval_batches


@dataclasses.dataclass
class NnxTrainResult:
  """What :func:`fit` returns.

  Attributes:
    model: the adapted model, trained in place (the one passed in).
    optimizer: its ``nnx.Optimizer`` (``optimizer.opt_state``: the method's state).
    history: ``{'step', 'train_loss', 'eval_*'}`` per evaluation (at the start and end).
    final_metrics: the ``eval_*`` metrics after training (empty without ``eval_data``).
    rank_pattern: the learned live rank of every adapted layer.
    losses: the task loss of every step.
    wall_time: seconds.
  """

  model: nnx.Module
  optimizer: nnx.Optimizer
  history: list
  final_metrics: dict
  rank_pattern: dict
  losses: list
  wall_time: float


def plain_opt_state(optimizer: nnx.Optimizer):
  """The optax state inside ``optimizer`` with the NNX Variables unwrapped (what the Linen
  loop's ``state.opt_state`` is, e.g. for :func:`jaxrank.adalora_rank_pattern`)."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda v: v.get_value() if is_var(v) else v, optimizer.opt_state,
                      is_leaf=is_var)


def prepare(model: nnx.Module, recipe: Recipe) -> nnx.Module:
  """Runs ``recipe.prepare`` on the Linen view and writes it back, new root gates included
  (SaLoRA's ``lagrange_multiplier`` and ``loss_scale`` become ``model.gates.<name>``)."""
  from jaxrank import nnx as jnnx
  if recipe.prepare is None:
    return model
  before = jnnx.to_linen_variables(model)
  after = _tree.plain(recipe.prepare(jnnx.adapter_of(model), before))
  extra = set(after) - {"params", "lora", "gates"}
  if extra:
    raise ValueError(f"recipe {recipe.name!r} adds collections {sorted(extra)}, which "
                     "jaxrank.nnx.fit cannot hold.")
  old_gates = before.get("gates", {})
  gate_type = _nnx_layers.gate_type_of(model)
  for name, value in after.get("gates", {}).items():
    if name in old_gates:
      continue
    if isinstance(value, Mapping):
      raise ValueError(f"recipe {recipe.name!r} adds gates under {name!r}, which is no "
                       "adapted layer.")
    if not isinstance(getattr(model, "gates", None), _nnx_layers.Gates):
      model.gates = _nnx_layers.Gates()
    setattr(model.gates, name, gate_type(jnp.asarray(value)))
  return jnnx.from_linen_variables(model, after)


def evaluate(model: nnx.Module, task: _tasks.Task, data, batch_size: int,
             _step: Optional[Callable] = None) -> dict:
  """``task.summarize`` of the summed ``task.metrics`` over every row of ``data``."""
  step = _step or make_eval_step(task)
  sums = None
  for batch in eval_batches(data, batch_size):
    out = step(model, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return task.summarize(jax.device_get(sums))


def make_eval_step(task: _tasks.Task) -> Callable:

  @nnx.jit
  def eval_step(model, batch):
    return task.metrics(task.apply(model, batch), batch)

  return eval_step


def _trainable_loss_fn(task: _tasks.Task, live: dict) -> Callable:
  """``loss_fn(trainable_view, batch)`` for recipes that score ranks by forwards (ALoRA).

  It rebuilds the model from the *traced* frozen state the step stores in ``live`` before
  each update, so the 135M frozen weights are never baked into the program as constants.
  """

  def loss_fn(view, batch):
    from jaxrank import nnx as jnnx
    graphdef, like, rest = live["split"]
    model = nnx.merge(graphdef, jnnx.from_linen_view(view, like), rest)
    return task.loss(task.apply(model, batch), batch)

  return loss_fn


def make_train_step(recipe: Recipe, task: _tasks.Task, live: Optional[dict] = None) -> Callable:
  """The jitted ``step(model, optimizer, batch, key) -> task_loss`` (updates in place).

  Streams ``'dropout'`` and ``recipe.train_rngs`` are split from ``key`` and given to the
  adapted layers through :func:`jaxrank.nnx.rngs`.
  """
  from jaxrank import nnx as jnnx
  names = tuple(dict.fromkeys(("dropout",) + tuple(recipe.train_rngs)))
  live = {} if live is None else live

  @nnx.jit
  def train_step(model, optimizer, batch, key):
    keys = dict(zip(names, jax.random.split(key, len(names))))
    adapter = jnnx.adapter_of(model)

    def objective(model):
      with _nnx_layers.rngs(**keys):
        outputs = task.apply(model, batch)
      task_loss = task.loss(outputs, batch)
      extra = (recipe.penalty(adapter, jnnx.to_linen_variables(model))
               if recipe.penalty is not None else 0.0)
      return task_loss + extra, task_loss

    grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, jnnx.TRAINABLE),
                                 has_aux=True)
    (_, task_loss), grads = grad_fn(model)
    live["split"] = nnx.split(model, jnnx.TRAINABLE, ...)
    optimizer.update(model, grads, value=jax.lax.stop_gradient(task_loss))
    return task_loss

  return train_step


class Training(NamedTuple):
  """What :func:`setup` returns: everything a training loop over ``model`` needs.

  Attributes:
    recipe: the recipe (built from its name when a string was passed).
    optimizer: ``nnx.Optimizer(model, jaxrank.nnx.transform(recipe tx), wrt=TRAINABLE)``.
    train_step: the jitted ``train_step(model, optimizer, batch, step_key) -> task_loss``.
    key: the rng key of the step chain (``key, step_key = jax.random.split(key)`` per step).
  """

  recipe: Recipe
  optimizer: nnx.Optimizer
  train_step: Callable
  key: jax.Array


def setup(model: nnx.Module, recipe: Union[Recipe, str], task: _tasks.Task, *, steps: int,
          learning_rate: float = 5e-4, targets: Any = "all-linear", seed: int = 0,
          validation_batch: Optional[Mapping[str, np.ndarray]] = None) -> Training:
  """Adapts ``model`` in place for ``recipe`` and builds its optimizer and jitted step.

  The same set-up as :func:`fit` (which calls it), for a loop of your own, e.g. one that
  checkpoints with :func:`jaxrank.nnx.save_checkpoint` and resumes. ``validation_batch`` is
  ALoRA's scoring batch (``fit`` takes the first batch of ``eval_data``).
  """
  from jaxrank import nnx as jnnx
  if isinstance(recipe, str):
    from jaxrank import recipes
    recipe = recipes.recipe(recipe, total_steps=steps)
  if recipe.adapter is None:
    raise ValueError("jaxrank.nnx.fit trains adapters; the frozen recipe has none.")
  if steps <= 0:
    raise ValueError(f"steps must be positive, got {steps}")
  key_init, key_train = jax.random.split(jax.random.key(seed))
  jnnx.wrap(model, recipe.targets if recipe.targets is not None else targets, recipe.adapter,
            rngs=nnx.Rngs(params=key_init))
  prepare(model, recipe)
  live: dict = {}
  ctx = RecipeContext(
      model=model, total_steps=steps, learning_rate=learning_rate,
      schedule=warmup_linear_schedule(learning_rate, steps),
      loss_fn=_trainable_loss_fn(task, live), validation_batch=validation_batch,
      num_matrices=len(jnnx.adapted_layers(model)))
  optimizer = nnx.Optimizer(model, jnnx.transform(recipe.optimizer(ctx)), wrt=jnnx.TRAINABLE)
  return Training(recipe=recipe, optimizer=optimizer,
                  train_step=make_train_step(recipe, task, live), key=key_train)


def fit(model: nnx.Module, recipe: Union[Recipe, str], task: _tasks.Task, *,
        train_data: Mapping[str, np.ndarray], eval_data: Optional[Mapping[str, np.ndarray]] = None,
        steps: int = 100, batch_size: int = 16, eval_batch_size: Optional[int] = None,
        learning_rate: float = 5e-4, targets: Any = "all-linear", seed: int = 0,
        progress: bool = True) -> NnxTrainResult:
  """Adapts ``model`` in place for ``recipe``, trains the adapter ``steps`` steps, evaluates.

  Args:
    model: an unadapted ``nnx.Module`` (e.g. :func:`jaxrank.models.llama_nnx.load_smollm2_nnx`).
    recipe: a :class:`jaxrank.Recipe` or a name of :data:`jaxrank.recipes.RECIPES` (its
      defaults at ``total_steps=steps``). The frozen baseline has nothing to train here.
    task: an NNX task (``apply(model, batch)``, see the module doc).
    train_data, eval_data: dicts of equal-length arrays; ``eval_data`` is evaluated before
      and after training and gives ALoRA its scoring batch.
    steps, batch_size, eval_batch_size: optimizer steps, rows per step and per evaluation.
    learning_rate: peak learning rate (warmup 6 %, then linear decay, as ``train.fit``).
    targets: adapter targets when ``recipe.targets`` is None (e.g. ``llama.ATTENTION_TARGETS``).
    seed: seeds the factors' initialisation, the batch order and the step's rngs.
  """
  from jaxrank import nnx as jnnx
  start = time.perf_counter()
  if steps <= 0 or batch_size <= 0:
    raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
  eval_batch_size = eval_batch_size or batch_size
  training = setup(model, recipe, task, steps=steps, learning_rate=learning_rate,
                   targets=targets, seed=seed,
                   validation_batch=(next(eval_batches(eval_data, batch_size))
                                     if eval_data is not None else None))
  recipe, optimizer, train_step = training.recipe, training.optimizer, training.train_step
  eval_step = make_eval_step(task)

  history, final = [], {}
  if eval_data is not None:
    metrics = evaluate(model, task, eval_data, eval_batch_size, eval_step)
    history.append({"step": 0, "train_loss": None, **{f"eval_{k}": v for k, v in metrics.items()}})
  iterator = batches(train_data, batch_size, seed=seed)
  bar = _progress.Bar(steps, recipe.name, progress)
  losses, key = [], training.key
  try:
    for step in range(1, steps + 1):
      key, step_key = jax.random.split(key)
      loss = float(train_step(model, optimizer, next(iterator), step_key))
      if not np.isfinite(loss):
        raise FloatingPointError(f"jaxrank.nnx.fit: the training loss is {loss} at step {step}.")
      losses.append(loss)
      bar.step(loss)
  finally:
    bar.close()

  opt_state = plain_opt_state(optimizer)
  if recipe.finalize is not None:
    jnnx.from_linen_variables(model, recipe.finalize(jnnx.adapter_of(model),
                                                     jnnx.to_linen_variables(model), opt_state))
  if eval_data is not None:
    metrics = evaluate(model, task, eval_data, eval_batch_size, eval_step)
    final = {f"eval_{k}": v for k, v in metrics.items()}
    history.append({"step": steps, "train_loss": losses[-1], **final})
  if recipe.rank_pattern is not None:
    pattern = recipe.rank_pattern(jnnx.adapter_of(model), jnnx.to_linen_variables(model),
                                  opt_state)
    pattern = {k: int(np.sum(v)) if np.asarray(v).dtype == bool else int(v)
               for k, v in pattern.items()}
  else:
    pattern = jnnx.rank_pattern(model)
  return NnxTrainResult(model=model, optimizer=optimizer, history=history, final_metrics=final,
                        rank_pattern=pattern, losses=losses, wall_time=time.perf_counter() - start)
