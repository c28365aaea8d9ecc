"""jaxrank.train: fit = setup + a jitted, donating make_train_step; the caller's arrays survive."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxrank import recipes
from jaxrank import tasks
from jaxrank import train


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic=True):
    h = nn.Dropout(0.2)(nn.tanh(nn.Dense(8, name="body")(x)), deterministic=deterministic)
    return nn.Dense(3, name="classifier")(h)


def _task():
  def apply(model, variables, batch, rngs=None, deterministic=True):
    return model.apply(variables, batch["x"], deterministic=deterministic, rngs=rngs or {})
  return tasks.Task(apply=apply, loss=tasks.classification_loss,
                    metrics=tasks.classification_metrics,
                    summarize=tasks.summarize_classification)


def _data(n=96):
  x = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)
  return {"x": x, "labels": (np.argmax(x[:, :3], -1)).astype(np.int32)}


def _variables():
  return Net().init(jax.random.key(0), _data()["x"][:1])


@pytest.mark.parametrize("method", [recipes.lora_recipe(rank=2), recipes.frozen_recipe()],
                         ids=["lora", "frozen"])
def test_fit_is_setup_plus_make_train_step(method):
  data, variables, steps, batch_size = _data(), _variables(), 5, 16
  result = train.fit(Net(), variables, method, _task(), train_data=data, steps=steps,
                     batch_size=batch_size, head=("classifier",), learning_rate=1e-2,
                     progress=False, seed=3)

  prepared = train.setup(Net(), variables, method, _task(),
                         first_batch=next(train.batches(data, batch_size, seed=3)), steps=steps,
                         learning_rate=1e-2, head=("classifier",), seed=3)
  step = jax.jit(train.make_train_step(prepared.model, method, _task(), prepared.tx),
                 donate_argnums=1)
  state, iterator = prepared.state, train.batches(data, batch_size, seed=3)
  for _ in range(steps):
    state, loss = step(prepared.frozen, state, next(iterator))
  assert int(state.step) == steps and np.isfinite(float(loss))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.trainable, result.state.trainable)
  # it trained: the head moved away from its initial value
  assert not np.allclose(state.trainable["head"]["classifier"]["kernel"],
                         variables["params"]["classifier"]["kernel"])


def test_fit_donates_its_state_but_never_the_callers_arrays():
  variables = _variables()
  before = jax.tree.map(np.array, variables)
  train.fit(Net(), variables, recipes.lora_recipe(rank=2), _task(), train_data=_data(), steps=3,
            batch_size=16, head=("classifier",), progress=False)
  # the head (trained, so donated by every step) started as a copy of the caller's arrays
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)


def test_make_train_step_deterministic_switches_dropout_off():
  data, variables, method = _data(), _variables(), recipes.lora_recipe(rank=2)
  batch = next(train.batches(data, 16, seed=0))
  prepared = train.setup(Net(), variables, method, _task(), first_batch=batch, steps=4,
                         learning_rate=1e-2, head=("classifier",))
  losses = {}
  for deterministic in (True, False):
    step = jax.jit(train.make_train_step(prepared.model, method, _task(), prepared.tx,
                                         deterministic=deterministic))
    losses[deterministic] = float(step(prepared.frozen, prepared.state, batch)[1])
  # without dropout the step's loss is the deterministic task loss at the initial state
  assert losses[True] == pytest.approx(float(prepared.loss_fn(prepared.state.trainable, batch)),
                                       rel=1e-6)
  assert losses[False] != pytest.approx(losses[True], rel=1e-6)


DATA_PARALLEL = """
import jax, numpy as np, pytest, sys
sys.path.insert(0, {tests!r})
from test_train import Net, _data, _task, _variables
from jaxrank import recipes, train
assert jax.device_count() == 4
auto = (jax.sharding.AxisType.Auto,)
mesh = jax.make_mesh((4,), ("data",), axis_types=auto)
kwargs = dict(train_data=_data(), eval_data=_data(40), steps=6, batch_size=16,
              eval_batch_size=8, eval_every=3, head=("classifier",), learning_rate=1e-2,
              progress=False, seed=1)
single = train.fit(Net(), _variables(), recipes.lora_recipe(rank=2, dropout=0.1), _task(), **kwargs)
split = train.fit(Net(), _variables(), recipes.lora_recipe(rank=2, dropout=0.1), _task(),
                  mesh=mesh, **kwargs)
# the same training, dropout masks included, whether or not the batch is split
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
             single.state.trainable, split.state.trainable)
for a, b in zip(single.history, split.history):
  assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
leaf = jax.tree.leaves(split.state.trainable)[0]
assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
for bad, message in [(dict(batch_size=18), "batch_size 18 does not split over the 4 devices"),
                     (dict(eval_batch_size=6), "eval_batch_size 6 does not split"),
                     (dict(data_axis="batch"), "not the data axis 'batch'")]:
  with pytest.raises(ValueError, match=message):
    train.fit(Net(), _variables(), recipes.lora_recipe(rank=2), _task(), mesh=mesh,
              **{{**kwargs, **bad}})
explicit = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
with pytest.raises(ValueError, match="needs an Auto axis"):
  train.fit(Net(), _variables(), recipes.lora_recipe(rank=2), _task(), mesh=explicit, **kwargs)
print("ok")
"""


def test_fit_on_a_mesh_splits_batches_and_trains_as_on_one_device():
  import os

  from multidevice import run_on_devices
  tests = os.path.dirname(os.path.abspath(__file__))
  assert run_on_devices(DATA_PARALLEL.format(tests=tests), devices=4).strip().endswith("ok")


@pytest.mark.parametrize("old, new", [
    ("Method", "Recipe"), ("MethodContext", "RecipeContext"), ("lora_method", None),
    ("frozen_method", None), ("Task", "Task"), ("classification_loss", "classification_loss"),
    ("summarize_causal_lm", "summarize_causal_lm")])
def test_the_moved_names_still_work_and_warn(old, new):
  import jaxrank
  with pytest.warns(DeprecationWarning, match=f"jaxrank.train.{old} is deprecated"):
    value = getattr(train, old)
  if new is not None:
    assert value is getattr(jaxrank._recipe if "Recipe" in new else tasks, new)
  else:
    assert value().name == old.split("_")[0]
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    train.nope


def test_fit_takes_a_recipe_name():
  result = train.fit(Net(), _variables(), "lora", _task(), train_data=_data(), steps=2,
                     batch_size=16, head=("classifier",), progress=False)
  assert result.method.name == "lora" and set(result.rank_pattern.values()) == {8}
