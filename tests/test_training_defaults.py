"""Defaults and counts a user meets: the BERT head, adapter dropout and weight decay of every
rank method, the head's weight decay, alpha's default, SaLoRA's trainable count, macro-F1 and
the step time kept in fit's history."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrank
from jaxrank import recipes
from jaxrank import tasks
from jaxrank import train

# ALoRA's eager update runs its scoring branch too (26 s here): a slow run
RANK_METHODS = ("sora", "adalora", "salora", pytest.param("alora", marks=pytest.mark.slow))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="classifier")(nn.tanh(nn.Dense(8, name="body")(x)))


def _data(n=32):
  x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
  return {"x": x, "labels": (x[:, 0] > 0).astype(np.int32)}


TASK = tasks.classification_task(lambda m, v, b, rngs=None, deterministic=True: m.apply(
    v, b["x"], rngs=rngs or {}))


def _prepared(method, head_weight_decay=0.0):
  data = _data()
  return train.setup(_Net(), _Net().init(jax.random.key(0), data["x"][:1]), method, TASK,
                     first_batch={k: v[:8] for k, v in data.items()}, steps=20,
                     learning_rate=0.1, head=("classifier",), validation_batch=data,
                     head_weight_decay=head_weight_decay)


def _zero_grad_update(prepared):
  """One update of the whole tx with zero gradients after the warmup step (lr > 0)."""
  state = prepared.state
  zeros = jax.tree.map(jnp.zeros_like, state.trainable)
  opt_state = state.opt_state
  for _ in range(2):  # step 0 has learning rate 0 (warmup)
    updates, opt_state = optax.with_extra_args_support(prepared.tx).update(
        zeros, opt_state, state.trainable, value=jnp.asarray(1.0))
  return updates


@pytest.mark.parametrize("name", RANK_METHODS)
def test_rank_methods_take_dropout_and_weight_decay(name):
  small = dict(rank=4, budget_rank=2)
  assert recipes.recipe(name, dropout=0.1, **small).adapter.dropout == 0.1
  assert recipes.recipe(name, **small).adapter.dropout == 0.0
  decayed = _zero_grad_update(_prepared(recipes.recipe(name, weight_decay=0.5, **small)))
  plain = _zero_grad_update(_prepared(recipes.recipe(name, **small)))
  # with zero gradients, AdamW's decoupled decay alone moves the factors
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(decayed["lora"])) > 0
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(plain["lora"])) == 0


def test_head_weight_decay_is_settable():
  method = recipes.lora_recipe(rank=2)
  decayed = _zero_grad_update(_prepared(method, head_weight_decay=0.5))["head"]
  plain = _zero_grad_update(_prepared(method))["head"]
  assert float(jnp.max(jnp.abs(decayed["classifier"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(plain["classifier"]["kernel"]))) == 0


def test_alpha_default_is_twice_the_starting_rank():
  for name in ("sora", "adalora", "salora", "svd"):
    assert recipes.recipe(name, rank=8, budget_rank=2).adapter.alpha == 16.0
  assert recipes.recipe("alora", rank=8, budget_rank=2).adapter.alpha == 4.0  # starts at 2
  assert recipes.recipe("lora", rank=8, budget_rank=3).adapter.alpha == 6.0
  assert recipes.recipe("sora", rank=8, alpha=5.0).adapter.alpha == 5.0


def test_trainable_count_leaves_out_salora_lagrange_multiplier_and_loss_scale():
  model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.SaLoRA(rank=3))
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  before = jaxrank.trainable_parameter_count(variables)
  assert before == 3 * (5 + 4) + 3  # A, B and log θ
  with_state = jaxrank.salora_add_loss_scale(jaxrank.add_lagrange_multiplier(variables))
  assert jaxrank.trainable_parameter_count(with_state) == before
  assert jaxrank.count_parameters(with_state)["gates"] == 3 + 2  # the two scalars are there


def test_bert_default_head_is_the_classifier_only():
  from jaxrank.models import bert
  assert bert.HEAD_MODULES == ("classifier",)
  assert bert.is_head_path(("classifier", "kernel"))
  assert not bert.is_head_path(("bert", "pooler", "dense", "kernel"))


def test_macro_f1_on_an_imbalanced_set():
  labels = np.array([0] * 6 + [1] * 4)
  predicted = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  logits = np.eye(2, dtype=np.float32)[predicted] * 3.0
  sums = tasks.classification_metrics(logits, {"labels": labels}, num_classes=2)
  # class 0: TP 5, FP 2, FN 1 -> 10/13; class 1: TP 2, FP 1, FN 2 -> 4/7
  assert tasks.summarize_classification(sums)["macro_f1"] == pytest.approx((10 / 13 + 4 / 7) / 2)
  assert tasks.summarize_classification(sums)["accuracy"] == pytest.approx(0.7)


def test_fit_keeps_the_step_time_after_compilation():
  data = _data()
  result = train.fit(_Net(), _Net().init(jax.random.key(0), data["x"][:1]),
                     recipes.lora_recipe(rank=2), TASK, train_data=data, eval_data=data,
                     steps=6, batch_size=8, eval_every=3, head=("classifier",),
                     progress=False)
  times = [r["step_time_s"] for r in result.history]
  assert len(times) == 2 and all(isinstance(t, float) and t > 0 for t in times)
  assert all(r["rank_pattern"] == {"body": 2} for r in result.history)
