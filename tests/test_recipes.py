"""jaxrank.recipes: every method's recipe builds and trains a few steps under jit."""

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
    h = nn.tanh(nn.Dense(8, name="body")(x))
    h = nn.tanh(nn.Dense(8, name="middle")(h))
    return nn.Dense(3, name="classifier")(h)


def _task():
  apply = lambda model, variables, batch, rngs=None, deterministic=True: model.apply(
      variables, batch["x"], rngs=rngs or {})
  return tasks.classification_task(apply)


def _data(n=64):
  x = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)
  return {"x": x, "labels": (np.argmax(x[:, :3], -1)).astype(np.int32)}


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_trains_under_jit_and_ends_within_the_budget(name):
  recipe = recipes.recipe(name, rank=4, budget_rank=2, total_steps=8)
  assert recipe.name == name
  data = _data()
  result = train.fit(Net(), Net().init(jax.random.key(0), data["x"][:1]), recipe, _task(),
                     train_data=data, eval_data=data, steps=8, batch_size=16,
                     head=("classifier",), learning_rate=1e-2, progress=False)
  assert np.isfinite(result.final_metrics["eval_loss"])
  assert int(result.state.step) == 8
  if name == "frozen":
    assert result.rank_pattern == {} and result.trainable_parameters == 0
  else:
    assert sorted(result.rank_pattern) == ["body", "middle"]
    assert sum(result.rank_pattern.values()) <= 2 * 2  # budget_rank x matrices
    assert all(0 <= r <= 4 for r in result.rank_pattern.values())


def test_defaults_are_the_documented_ones():
  assert recipes.recipe("lora").adapter.rank == 8  # no budget: the capacity
  assert recipes.recipe("lora", budget_rank=4).adapter.rank == 4  # LoRA at the budget
  for name in ("sora", "adalora", "salora"):
    spec = recipes.recipe(name).adapter
    assert (spec.rank, spec.alpha) == (8, 16.0)  # alpha = 2 x rank
  alora = recipes.recipe("alora").adapter
  assert (alora.rank, alora.initial_rank, alora.alpha) == (8, 4, 8.0)  # 2 x the initial rank
  assert recipes.recipe("sora", alpha=3.0).adapter.alpha == 3.0
  assert recipes.recipe("salora").train_rngs == ("dropout", "hard_concrete")
  assert recipes.recipe("alora").separate_head is False


def test_unknown_recipe_names_the_valid_ones():
  with pytest.raises(ValueError, match="unknown recipe 'dora'; choose from frozen, lora, sora"):
    recipes.recipe("dora")
  with pytest.raises(TypeError):
    recipes.recipe("sora", no_such_option=1)


def test_alora_scoring_chunk_defaults_to_one_on_cpu_and_can_be_set():
  default = recipes.alora_chunk_size()
  assert default == (1 if jax.default_backend() == "cpu" else 32)
  assert recipes.alora_chunk_size(16) == 16
