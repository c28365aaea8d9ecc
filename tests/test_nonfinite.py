"""A NaN is never a rank decision (issue 17): every method transform skips and counts a
non-finite update, an ALoRA round with non-finite scores is not applied, and the reference loop
stops at the poisoned step with the previous state intact and restorable."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrank
import method_configs
import toy_training
from jaxrank import recipes
from jaxrank import train
from test_failures import BATCH, _nan_at_step
from test_train import Net, _data, _task, _variables

TOTAL = 24
POISONED_AT = 7  # steps done before the poisoned one: inside every method's pruning window


def _sora_budget(total_steps, axis_name=None):
  del axis_name
  tx = jaxrank.sora_budget(optax.adam(1e-2), budget=4, learning_rate=1e-2, lam=0.1,
                           t_init=2, t_final=total_steps - 4, normalize=False)
  return method_configs.Config(jaxrank.SoRA(rank=4), tx)


def _svd(total_steps, axis_name=None):
  del axis_name
  tx = jaxrank.svd_truncation(optax.adam(1e-2), budget=4, cut_step=POISONED_AT, scale=2.0)
  return method_configs.Config(jaxrank.SVDTruncation(rank=4), tx)


# every jaxrank method transform (plain LoRA is plain optax: the loop must stop its NaN)
CONFIGS = {**{k: v for k, v in method_configs.CONFIGS.items() if k not in ("lora", "lora_dropout")},
           "sora_budget": _sora_budget, "svd": _svd}


def _trained(name, steps):
  config = CONFIGS[name](TOTAL)
  model, frozen, state, (x, y) = toy_training.setup(config, TOTAL)
  step = jax.jit(toy_training.make_step(config, model))
  for t in range(steps):
    state = step(state, frozen, x[t], y[t])
  return config, model, frozen, state, step, (x, y)


def _without_counts(tree):
  """The tree with every non-finite counter set to 0 (to compare the rest exactly)."""
  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      fields = {f: visit(getattr(node, f)) for f in node._fields}
      for counter in ("nonfinite_count", "notfinite_count", "total_notfinite", "last_finite"):
        if counter in fields:  # jaxrank's counter; optax.apply_if_finite's
          fields[counter] = 0
      return type(node)(**fields)
    if isinstance(node, (list, tuple)):
      return type(node)(visit(c) for c in node)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return node
  return visit(tree)


def _host(x):
  if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _assert_equal(a, b):
  a, b = jax.tree.map(_host, _without_counts(a)), jax.tree.map(_host, _without_counts(b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_nan_gradient_changes_no_gate_no_score_and_is_counted(name):
  config, model, frozen, state, step, (x, y) = _trained(name, POISONED_AT)
  x_bad = x[POISONED_AT].at[0, 0].set(jnp.nan)
  poisoned = step(state, frozen, x_bad, y[POISONED_AT])
  before = jaxrank.rank_pattern(model, jaxrank.join_variables(frozen, state["trainable"]))
  # the method skipped the whole update: gates, factors, EMAs, budget step, pattern unchanged
  _assert_equal(poisoned["trainable"], state["trainable"])
  _assert_equal(poisoned["opt_state"], state["opt_state"])
  counted = int(jaxrank.nonfinite_total(poisoned["opt_state"]))
  assert counted == int(jaxrank.nonfinite_total(state["opt_state"])) + 1
  after = jaxrank.rank_pattern(model, jaxrank.join_variables(frozen, poisoned["trainable"]))
  assert after == before and sum(after.values()) > 0
  # and training goes on from there exactly as if the poisoned step had not happened
  # (the toy loop itself still advances its own step counter and rng)
  poisoned = {**poisoned, "step": state["step"], "rng": state["rng"]}
  go_on = lambda s: step(s, frozen, x[POISONED_AT + 1], y[POISONED_AT + 1])
  _assert_equal({k: go_on(poisoned)[k] for k in ("trainable", "opt_state")},
                {k: go_on(state)[k] for k in ("trainable", "opt_state")})


def test_an_alora_round_with_nan_scores_is_not_applied_and_says_so():
  config, model, frozen, state, step, (x, y) = _trained("alora", POISONED_AT)
  clean_args = config.extra_args(model, frozen, x[0], y[0])
  frozen_val, x_val, y_val = clean_args["validation_batch"]
  bad_batch = (frozen_val, x_val.at[3, 1].set(jnp.nan), y_val)
  tx = config.optimizer
  grads = jax.grad(lambda t: jnp.mean(
      (model.apply(jaxrank.join_variables(frozen, t), x[POISONED_AT]) - y[POISONED_AT]) ** 2)
  )(state["trainable"])
  good_updates, good_state = jax.jit(tx.update)(grads, state["opt_state"], state["trainable"],
                                                validation_batch=clean_args["validation_batch"])
  bad_updates, bad_state = jax.jit(tx.update)(grads, state["opt_state"], state["trainable"],
                                              validation_batch=bad_batch)
  assert int(good_state.rounds_done) == int(state["opt_state"].rounds_done) + 1  # a round step
  assert int(bad_state.rounds_done) == int(state["opt_state"].rounds_done)
  assert int(bad_state.nonfinite_count) == 1 and int(good_state.nonfinite_count) == 0
  masks = lambda tree: jax.tree.map(np.asarray, tree["gates"])
  stepped = optax.apply_updates(state["trainable"], bad_updates)
  _assert_equal(masks(stepped), masks(state["trainable"]))  # no rank pruned or added
  _assert_equal(bad_state.last_scores, state["opt_state"].last_scores)
  assert not jax.tree.all(jax.tree.map(
      lambda a, b: np.array_equal(a, b), masks(optax.apply_updates(state["trainable"],
                                                                     good_updates)),
      masks(state["trainable"])))  # the clean round did move ranks


# --- the reference loop: NaN injected at step k, for every method -----------------------------
@pytest.mark.parametrize("name", ["lora", "svd", "sora", "adalora", "salora", "alora"])
def test_fit_stops_at_the_poisoned_step_with_the_previous_state_restorable(name, tmp_path):
  k, steps = 6, 12
  kept = {}

  def on_eval(step, record, state):
    kept[step] = state

  with pytest.raises(jaxrank.NonFiniteError) as info:
    train.fit(Net(), _variables(), recipes.recipe(name, total_steps=steps, rank=2, budget_rank=1), _task(),
              train_data=_nan_at_step(k), eval_data=_data(32), steps=steps, batch_size=BATCH,
              head=("classifier",), learning_rate=1e-2, progress=False, eval_every=1,
              on_eval=on_eval)
  error = info.value
  assert error.step == k and f"step {k}" in str(error)
  assert int(error.state.step) == k - 1
  _assert_equal(error.state, kept[k - 1])  # the state after step k-1, untouched
  path = train.save_checkpoint(tmp_path, error.state)
  restored = jaxrank.checkpoint.restore(path, error.state)
  _assert_equal(restored, error.state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.trainable))
