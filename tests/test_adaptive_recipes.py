"""AdaLoRA and ALoRA recipes: exactly the budget at the end of jaxrank.train.fit, by themselves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrank
from jaxrank import recipes
from jaxrank import tasks
from jaxrank import train


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(8, name="l0")(x))
    x = jnp.tanh(nn.Dense(8, name="l1")(x))
    return nn.Dense(8, name="l2")(x)


def _mse(outputs, batch):
  w = batch.get("weight", jnp.ones(outputs.shape[0]))
  return jnp.sum(jnp.mean((outputs - batch["y"]) ** 2, -1) * w) / jnp.maximum(jnp.sum(w), 1.0)


TASK = tasks.Task(
    apply=lambda model, v, batch, rngs=None, deterministic=True: model.apply(
        v, batch["x"], rngs=rngs or {}),
    loss=_mse,
    metrics=lambda o, b: {"sse": _mse(o, b) * o.shape[0], "count": jnp.asarray(o.shape[0], float)},
    summarize=lambda s: {"mse": float(s["sse"]) / float(s["count"])})


def _data(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8)).astype(np.float32)
  return {"x": x, "y": np.sin(x @ rng.normal(size=(8, 8)).astype(np.float32) / 3)}


@pytest.mark.parametrize("name", ["adalora", "alora"])
def test_recipe_ends_at_exactly_the_budget_without_a_cut(name):
  steps, budget_rank = 60, 2
  recipe = recipes.recipe(name, rank=4, budget_rank=budget_rank, total_steps=steps)
  assert recipe.finalize is None  # no post-hoc cut
  base = MLP()
  params = base.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  result = train.fit(base, {"params": params}, recipe, TASK, train_data=_data(256, 0),
                     eval_data=_data(32, 1), steps=steps, batch_size=16, learning_rate=1e-2,
                     progress=False)
  assert sum(result.rank_pattern.values()) == budget_rank * 3
  _, _, compacted = jaxrank.compact(result.model, result.variables)
  assert compacted == result.rank_pattern


def test_research_defaults():
  ada = recipes.adalora_recipe(rank=4, budget_rank=2)
  assert ada.adapter.init_std is None and ada.penalty is None  # γ is inside the transform
  alora = recipes.alora_recipe(rank=4, budget_rank=2)
  assert alora.adapter.initial_rank == 2 and alora.separate_head is False
