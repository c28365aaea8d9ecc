"""ALoRA: AB-LoRA scores (eq. 6), prune + reallocate, the K1/K2/N_A schedule transform."""

import functools

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import jaxrank
import scan_models


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(12, name="l0")(x))
    x = nn.relu(nn.Dense(12, name="l1")(x))
    return nn.Dense(6, name="l2")(x)






SPEC = jaxrank.ALoRA(rank=5, initial_rank=2, alpha=2.0)


def _randomised(variables, seed=1):
  """Non-zero B factors so every rank changes the function."""
  key = jax.random.key(seed)
  leaves, treedef = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(key, len(leaves))
  leaves = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return {**variables, "lora": jax.tree.unflatten(treedef, leaves)}


def _setup(module=None, spec=SPEC, in_dim=8, seed=0):
  module = MLP() if module is None else module
  model = jaxrank.wrap(module, adapter=spec)
  x = jax.random.normal(jax.random.key(seed + 10), (16, in_dim))
  variables = _randomised(model.init(jax.random.key(seed), x))
  y = jax.random.normal(jax.random.key(seed + 20), (16,) + model.apply(variables, x).shape[1:])

  def loss_fn(v, batch):
    return jnp.mean((model.apply(v, batch[0]) - batch[1]) ** 2)

  return model, variables, (x, y), loss_fn


def _live(spec, params):
  return jaxrank.live_rank_total(spec, params)


def _masks(params):
  return {k: np.asarray(v) for k, v in jaxrank.rank_masks(SPEC, params).items()}


# --- the spec --------------------------------------------------------------------------------


def test_spec_initial_gates_scale_and_frozen_gate():
  model, variables, batch, loss_fn = _setup()
  assert jaxrank.rank_pattern(model, variables) == {"l0": 2, "l1": 2, "l2": 2}
  np.testing.assert_array_equal(variables["gates"]["l0"]["mask"], [1, 1, 0, 0, 0])
  assert SPEC.scale == 1.0  # alpha / initial_rank
  grads = jax.jit(jax.grad(loss_fn))(variables, batch)
  for g in jax.tree.leaves(grads["gates"]):
    np.testing.assert_array_equal(g, 0)  # stop_gradient: gates are not trained


def test_spec_rejects_capacity_without_free_slots():
  with pytest.raises(ValueError, match="rank > initial_rank"):
    jaxrank.ALoRA(rank=4, initial_rank=4)
  with pytest.raises(ValueError, match="initial_rank"):
    jaxrank.ALoRA(rank=4, initial_rank=0)


# --- AB-LoRA scores --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 32])
def test_batched_scores_equal_naive_loop(chunk_size):
  model, variables, batch, loss_fn = _setup()
  # kill one live rank and open a spare slot, so the live set is irregular
  gates = variables["gates"]
  gates = {**gates, "l1": {"mask": jnp.array([0.0, 1, 0, 1, 0])}}
  variables = {**variables, "gates": gates}
  naive = jaxrank.ablation_scores_naive(loss_fn, model, variables, batch)
  batched = jaxrank.ablation_scores(loss_fn, model, variables, batch, chunk_size=chunk_size)
  for path in naive:
    np.testing.assert_array_equal(np.isnan(naive[path]), np.isnan(batched[path]))
    np.testing.assert_allclose(batched[path], naive[path], atol=1e-5, rtol=0)
  # dead slots are nan, live ones finite
  live = _masks(variables)
  for path, mask in live.items():
    assert np.all(np.isfinite(np.asarray(batched[path])[mask]))


def test_batched_scores_under_jit_and_scan_stacked_layers():
  spec = jaxrank.ALoRA(rank=3, initial_rank=2)
  model, variables, batch, loss_fn = _setup(scan_models.Scanned(stack_name="blocks"), spec=spec,
                                            in_dim=4)
  assert variables["gates"]["blocks"]["mix"]["mask"].shape == (3, 3)
  naive = jaxrank.ablation_scores_naive(loss_fn, model, variables, batch)
  jitted = jax.jit(lambda v, b: jaxrank.ablation_scores(loss_fn, model, v, b, chunk_size=4))
  batched = jitted(variables, batch)
  np.testing.assert_allclose(batched["blocks/mix"], naive["blocks/mix"], atol=1e-5)
  assert int(np.sum(np.isfinite(np.asarray(naive["blocks/mix"])))) == 6


def test_scores_follow_eq6_by_hand():
  model, variables, batch, loss_fn = _setup()
  scores = jaxrank.ablation_scores(loss_fn, model, variables, batch)
  full = loss_fn(variables, batch)

  def with_l0(mask_l0, others):
    gates = {p: {"mask": others * variables["gates"][p]["mask"]} for p in ("l1", "l2")}
    return {**variables, "gates": {"l0": {"mask": jnp.asarray(mask_l0, jnp.float32)}, **gates}}

  ablated = loss_fn(with_l0([0, 1, 0, 0, 0], 1.0), batch)
  alone = loss_fn(with_l0([1, 0, 0, 0, 0], 0.0), batch)
  expected = (-full) - (-ablated) + (-alone)  # IS = S(M) - S(M\r) + S(M_r), S = -loss
  np.testing.assert_allclose(scores["l0"][0], expected, atol=1e-5)


# --- reallocation plan -----------------------------------------------------------------------


def test_footnote_example_even_split_remainder_to_most_important():
  # module 0 holds the 8 weakest ranks (all pruned); modules 1-3 lose none and share them.
  capacity = 10
  mask = np.zeros((4, capacity))
  scores = np.full((4, capacity), np.nan)
  mask[0, :8] = 1
  scores[0, :8] = -10.0  # the 8 weakest: all pruned
  for module, value in ((1, 3.0), (2, 2.0), (3, 1.0)):  # m1 > m2 > m3 (mean importance)
    mask[module, :2] = 1
    scores[module, :2] = value
  pruned, added = jaxrank.reallocation_plan(
      jnp.asarray(mask.ravel()), jnp.asarray(scores.ravel()), 8, capacity)
  pruned, added = np.asarray(pruned).reshape(4, -1), np.asarray(added).reshape(4, -1)
  assert pruned.sum(axis=1).tolist() == [8, 0, 0, 0]
  assert added.sum(axis=1).tolist() == [0, 3, 3, 2]  # paper footnote 3: 8 over 3 -> 3, 3, 2
  assert not np.any(added & (mask != 0))  # only free slots


def test_full_modules_are_skipped_and_budget_shrinks_only_without_receivers():
  capacity = 4
  # module 0 loses 2; module 1 is full (4/4 live) so it cannot receive; module 2 gets both
  mask = jnp.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0.])
  scores = jnp.array([-9, -8, 1, jnp.nan, 5, 5, 5, 5, 2, jnp.nan, jnp.nan, jnp.nan])
  pruned, added = _jitted_plan(mask, scores, 2, capacity)
  assert np.asarray(pruned).reshape(3, -1).sum(1).tolist() == [2, 0, 0]
  assert np.asarray(added).reshape(3, -1).sum(1).tolist() == [0, 0, 2]
  # every module loses a rank (n_A = 3): nobody receives, the live total shrinks by 3 (paper)
  mask = jnp.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0.])
  scores = jnp.array([-9, 1, jnp.nan, jnp.nan, -8, 1, jnp.nan, jnp.nan, -7, 1, jnp.nan, jnp.nan])
  pruned, added = _jitted_plan(mask, scores, 3, capacity, keep_budget=False)
  assert int(np.sum(pruned)) == 3 and int(np.sum(added)) == 0
  # keep_budget (default): the ranks go back to the modules live this round (issue 16)
  pruned, added = _jitted_plan(mask, scores, 3, capacity)
  assert int(np.sum(pruned)) == 3 and int(np.sum(added)) == 3


def test_keep_budget_fills_receivers_first_then_the_modules_that_lost_ranks():
  capacity = 3
  # n_A = 4: modules 0 and 1 lose 2 each; module 2 (1 free slot) receives 1, the other 3 go
  # back to modules 1 (mean -4, first) and 0 (mean -4.3) round-robin; module 3 (never live)
  # gets none
  mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0.])
  scores = jnp.array([-9, -8, 4, -7, -6, 1, 3, 3, jnp.nan, jnp.nan, jnp.nan, jnp.nan])
  pruned, added = _jitted_plan(mask, scores, 4, capacity)
  assert np.asarray(pruned).reshape(4, -1).sum(1).tolist() == [2, 2, 0, 0]
  assert np.asarray(added).reshape(4, -1).sum(1).tolist() == [1, 2, 1, 0]
  live = np.asarray(mask, bool) & ~np.asarray(pruned) | np.asarray(added)
  assert live.sum() == 8


@st.composite
def _plans(draw):
  # fixed shapes (one compile); modules without live ranks stand in for smaller networks
  modules, capacity = 4, 5
  live = np.array(draw(st.lists(st.booleans(), min_size=modules * capacity,
                                max_size=modules * capacity)))
  # no subnormals: XLA:CPU flushes them to zero, which would make 3e-44 and 0.0 a tie
  scores = np.array(draw(st.lists(st.floats(-5, 5, allow_nan=False, allow_subnormal=False,
                                            width=32),
                                  min_size=modules * capacity, max_size=modules * capacity)))
  num = draw(st.integers(0, max(int(live.sum()), 0)))
  return modules, capacity, live, np.where(live, scores, np.nan), num


_jitted_plan = jax.jit(jaxrank.reallocation_plan, static_argnums=3,
                       static_argnames="keep_budget")


@settings(max_examples=50, deadline=None)
@given(_plans())
def test_keep_budget_plan_keeps_the_total_live_rank(plan):
  modules, capacity, live, scores, num = plan
  pruned, added = _jitted_plan(jnp.asarray(live, jnp.float32), jnp.asarray(scores, jnp.float32),
                               num, capacity)
  pruned, added = np.asarray(pruned), np.asarray(added)
  assert pruned.sum() == num and added.sum() == num
  new_live = live & ~pruned | added
  assert new_live.sum() == live.sum()
  grid = lambda v: v.reshape(modules, capacity)
  assert np.all(grid(added).sum(1)[~grid(live).any(1)] == 0)  # dead modules stay dead
  assert not np.any(added & live & ~pruned)


@settings(max_examples=50, deadline=None)
@given(_plans())
def test_reallocation_plan_properties(plan):
  modules, capacity, live, scores, num = plan
  fn = _jitted_plan
  pruned, added = fn(jnp.asarray(live, jnp.float32), jnp.asarray(scores, jnp.float32),
                     num, capacity, keep_budget=False)
  pruned, added = np.asarray(pruned), np.asarray(added)
  # exactly n_A live ranks pruned, the lowest-scoring ones
  assert pruned.sum() == num and np.all(live[pruned])
  if 0 < num < live.sum():
    assert scores[pruned].max() <= scores[live & ~pruned].min()
  # added: free slots of modules that lost none, had a live rank, had room
  assert not np.any(added & live)
  grid = lambda v: v.reshape(modules, capacity)
  lost = grid(pruned).any(axis=1)
  add = grid(added).sum(axis=1)
  free = capacity - grid(live).sum(axis=1)
  receiver = ~lost & grid(live).any(axis=1) & (free > 0)
  assert np.all(add[~receiver] == 0)
  assert add.sum() == min(num, free[receiver].sum())  # budget kept unless no room
  # as even as possible: one can fall behind another by 2+ only when its slots ran out
  scored = grid(live).sum(axis=1)
  means = np.where(grid(live), grid(scores), 0.0).sum(axis=1) / np.maximum(scored, 1)
  for i in np.flatnonzero(receiver):
    for j in np.flatnonzero(receiver):
      if add[i] < add[j] - 1:
        assert add[i] == free[i]
      if add[i] < add[j] and add[i] < free[i]:
        assert means[i] <= means[j] + 1e-6  # the remainder goes to higher mean importance


# --- prune and reallocate on a model ---------------------------------------------------------


def test_function_unchanged_at_reallocation():
  model, variables, batch, loss_fn = _setup()
  scores = jaxrank.ablation_scores(loss_fn, model, variables, batch)
  new, info = jax.jit(
      lambda v, s: jaxrank.prune_and_reallocate(model, v, s, num_prune=2, rng=jax.random.key(3))
  )(variables, scores)
  assert sum(int(np.sum(m)) for m in info.pruned.values()) == 2
  assert sum(int(np.sum(m)) for m in info.added.values()) == 2
  assert _live(model, new) == _live(model, variables)
  # the pruned-only network ...
  pruned_only = {**variables, "gates": {
      p: {"mask": variables["gates"][p]["mask"] * ~info.pruned[p]} for p in info.pruned}}
  out_pruned = model.apply(pruned_only, batch[0])
  # ... computes exactly what the reallocated one does (new slots: B = 0, gate 1, new A)
  np.testing.assert_allclose(model.apply(new, batch[0]), out_pruned, atol=1e-6)
  for path, added in info.added.items():
    added = np.asarray(added)
    if added.any():
      np.testing.assert_array_equal(np.asarray(new["gates"][path]["mask"])[added], 1)
      np.testing.assert_array_equal(np.asarray(new["lora"][path]["B"])[added], 0)
      assert not np.allclose(np.asarray(new["lora"][path]["A"])[:, added],
                             np.asarray(variables["lora"][path]["A"])[:, added])


def test_prune_rejects_more_than_live():
  model, variables, batch, loss_fn = _setup()
  scores = jaxrank.ablation_scores(loss_fn, model, variables, batch)
  with pytest.raises(ValueError, match="larger than the 6 live ranks"):
    jaxrank.prune_and_reallocate(model, variables, scores, num_prune=7, rng=jax.random.key(0))


def test_optimizer_state_of_new_slots_is_reset():
  model, variables, batch, loss_fn = _setup()
  frozen, trainable = jaxrank.split_variables(variables)
  opt = optax.adam(1e-2)
  state = opt.init(trainable)
  loss_t = lambda t, b: loss_fn({**frozen, **t}, b)
  # make every slot's moments non-zero (gates have zero grads; perturb them for the test)
  grads = jax.grad(loss_t)(trainable, batch)
  grads = jax.tree.map(lambda g: g + 0.1, grads)
  _, state = opt.update(grads, state, trainable)
  old_mu = state[0].mu
  _, new_state, _, info = jaxrank.alora_round(
      loss_t, model, trainable, batch, rng=jax.random.key(0), num_prune=3, optimizer=opt,
      opt_state=state)
  mu = new_state[0].mu
  assert int(new_state[0].count) == int(state[0].count)
  for path, added in info.added.items():
    added = np.asarray(added)
    a, old_a = np.asarray(mu["lora"][path]["A"]), np.asarray(old_mu["lora"][path]["A"])
    b, old_b = np.asarray(mu["lora"][path]["B"]), np.asarray(old_mu["lora"][path]["B"])
    np.testing.assert_array_equal(a[:, added], 0)
    np.testing.assert_array_equal(b[added], 0)
    np.testing.assert_array_equal(a[:, ~added], old_a[:, ~added])
    np.testing.assert_array_equal(b[~added], old_b[~added])
  assert sum(int(np.sum(m)) for m in info.added.values()) == 3


def test_optimizer_state_reset_through_partition_on_full_variables():
  model, variables, batch, loss_fn = _setup()
  opt = optax.partition({"params": optax.set_to_zero(), "lora": optax.adam(1e-2),
                         "gates": optax.set_to_zero()}, jaxrank.collection_labels)
  state = opt.init(variables)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), variables)
  _, state = opt.update(grads, state, variables)
  _, new_state, _, info = jaxrank.alora_round(loss_fn, model, variables, batch,
                                            rng=jax.random.key(0), num_prune=2,
                                            optimizer=opt, opt_state=state)
  mu = new_state.inner_states["lora"].inner_state[0].mu["lora"]
  old = state.inner_states["lora"].inner_state[0].mu["lora"]
  changed = 0
  for path, added in info.added.items():
    added = np.asarray(added)
    np.testing.assert_array_equal(np.asarray(mu[path]["B"])[added], 0)
    np.testing.assert_array_equal(np.asarray(mu[path]["B"])[~added],
                                  np.asarray(old[path]["B"])[~added])
    changed += int(added.sum())
  assert changed == 2


# --- the schedule transform ------------------------------------------------------------------


def test_schedule_errors():
  model, variables, batch, loss_fn = _setup()
  with pytest.raises(ValueError, match="exceed total_steps"):
    jaxrank.alora(optax.sgd(0.1), model, loss_fn, warmup_steps=10, recovery_steps=5,
                num_rounds=3, total_steps=24)
  with pytest.raises(ValueError, match="recovery_steps"):
    jaxrank.alora(optax.sgd(0.1), model, loss_fn, warmup_steps=10, recovery_steps=0, num_rounds=3)
  with pytest.raises(ValueError, match="warmup_steps"):
    jaxrank.alora(optax.sgd(0.1), model, loss_fn, warmup_steps=0, recovery_steps=1, num_rounds=3)
  tx = jaxrank.alora(optax.sgd(0.1), model, loss_fn, warmup_steps=1, recovery_steps=1,
                   num_rounds=1, ranks_per_round=7)
  with pytest.raises(ValueError, match="larger than the 6 live ranks"):
    tx.init(variables)
  tx = jaxrank.alora(optax.sgd(0.1), model, loss_fn, warmup_steps=1, recovery_steps=1,
                   num_rounds=1)
  state = tx.init(variables)
  with pytest.raises(ValueError, match="validation batch"):
    tx.update(variables, state, variables)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(variables, state, validation_batch=batch)
  with pytest.raises(TypeError, match="ALoRA"):
    jaxrank.alora(optax.sgd(0.1), jaxrank.LoRA(), loss_fn, warmup_steps=1, recovery_steps=1,
                num_rounds=1)


def _planted_task(planted, seed=0):
  """A frozen random ReLU MLP; the teacher adds rank-``planted[l]`` updates to layer l."""
  spec = jaxrank.ALoRA(rank=6, initial_rank=2, alpha=2.0)
  model = jaxrank.wrap(MLP(), adapter=spec)
  variables = model.init(jax.random.key(seed), jnp.ones((1, 8)))
  teacher = jax.tree.map(lambda a: a, variables["params"])
  key = jax.random.key(seed + 1)
  for name, r in planted.items():
    if r:
      key, k1, k2 = jax.random.split(key, 3)
      kernel = teacher[name]["kernel"]
      u = jax.random.normal(k1, (kernel.shape[0], r))
      v = jax.random.normal(k2, (r, kernel.shape[1]))
      teacher[name]["kernel"] = kernel + u @ v / np.sqrt(kernel.shape[0])
  target = lambda x: MLP().apply({"params": teacher}, x)
  return spec, model, variables, target


def test_planted_rank_task_ranks_move_and_budget_is_kept():
  spec, model, variables, target = _planted_task({"l0": 3, "l1": 0, "l2": 3})
  frozen, trainable = jaxrank.split_variables(variables)

  def loss_fn(t, batch):
    return jnp.mean((model.apply({**frozen, **t}, batch[0]) - batch[1]) ** 2)

  x_val = jax.random.normal(jax.random.key(7), (64, 8))
  k1, k2, rounds = 300, 100, 4
  tx = jaxrank.alora(optax.adam(1e-2), model, loss_fn, warmup_steps=k1, recovery_steps=k2,
                   num_rounds=rounds, ranks_per_round=1, total_steps=k1 + rounds * k2)
  state = tx.init(trainable)

  @jax.jit
  def step(t, state, key):
    x = jax.random.normal(key, (64, 8))
    grads = jax.grad(loss_fn)(t, (x, target(x)))
    updates, state = tx.update(grads, state, t, validation_batch=(x_val, target(x_val)))
    return optax.apply_updates(t, updates), state

  budget = _live(spec, trainable)
  round_steps = {k1 + j * k2 for j in range(rounds)}
  patterns = []
  for i in range(k1 + rounds * k2):
    before = trainable
    trainable, state = step(trainable, state, jax.random.key(100 + i))
    if i + 1 in round_steps:
      # one rank pruned, one rank re-added elsewhere: the total live rank is the budget
      assert _live(spec, trainable) == budget
      gone = {p: _masks(before)[p] & ~_masks(trainable)[p] for p in ("l0", "l1", "l2")}
      new = {p: ~_masks(before)[p] & _masks(trainable)[p] for p in ("l0", "l1", "l2")}
      assert sum(int(g.sum()) for g in gone.values()) == 1
      assert sum(int(g.sum()) for g in new.values()) == 1
      for p in new:
        if new[p].any():  # a receiving layer lost nothing; its new slots start at B = 0
          assert not gone[p].any()
          np.testing.assert_array_equal(np.asarray(trainable["lora"][p]["B"])[new[p]], 0)
      patterns.append(jaxrank.rank_pattern(spec, trainable))
    elif i + 1 in {k1 - 1, k1 + 1, k1 + rounds * k2}:  # gates change only at rounds
      for p in ("l0", "l1", "l2"):
        np.testing.assert_array_equal(_masks(before)[p], _masks(trainable)[p])
  assert int(state.rounds_done) == rounds
  final = patterns[-1]
  assert final["l1"] == 0  # the layer with no planted update lost its ranks
  assert final["l0"] + final["l2"] == budget  # ... to the layers with planted rank
  assert final["l0"] > 2 or final["l2"] > 2


def test_round_step_matches_plain_functions():
  """The transform's round equals score -> prune_and_reallocate on the stepped params."""
  model, variables, batch, loss_fn = _setup()
  frozen, trainable = jaxrank.split_variables(variables)
  loss_t = lambda t, b: loss_fn({**frozen, **t}, b)
  opt = optax.sgd(1e-2)
  tx = jaxrank.alora(opt, model, loss_t, warmup_steps=1, recovery_steps=1, num_rounds=1,
                   validation_batch=batch, seed=5)
  state = tx.init(trainable)
  grads = jax.grad(loss_t)(trainable, batch)
  updates, state = jax.jit(tx.update)(grads, state, trainable)
  got = optax.apply_updates(trainable, updates)
  stepped = optax.apply_updates(trainable, opt.update(grads, opt.init(trainable))[0])
  stepped = {**stepped, "gates": trainable["gates"]}
  scores = jaxrank.ablation_scores(loss_t, model, stepped, batch)
  for p in scores:
    np.testing.assert_allclose(state.last_scores[p], scores[p], atol=1e-5)
  want, info = jaxrank.prune_and_reallocate(model, stepped, scores, rng=jax.random.key(0))
  for p in scores:
    np.testing.assert_array_equal(got["gates"][p]["mask"], want["gates"][p]["mask"])
    np.testing.assert_allclose(got["lora"][p]["B"], want["lora"][p]["B"], atol=1e-6)
  pruned = sum(int(np.sum(m)) for m in info.pruned.values())
  added = sum(int(np.sum(m)) for m in info.added.values())
  assert pruned == 3  # n_A defaults to one per adapted matrix
  assert _live(model, got) == 6 - pruned + added


def test_multisteps_accumulation_gives_the_same_ranks_as_the_big_batch():
  model, variables, batch, loss_fn = _setup()
  frozen, trainable = jaxrank.split_variables(variables)
  loss_t = lambda t, b: loss_fn({**frozen, **t}, b)
  make = lambda: jaxrank.alora(optax.sgd(0.05), model, loss_t, warmup_steps=3, recovery_steps=2,
                             num_rounds=2, ranks_per_round=2, total_steps=7,
                             validation_batch=batch)
  big, accumulated = make(), optax.MultiSteps(make(), every_k_schedule=2)

  @functools.partial(jax.jit, static_argnums=0)
  def step(tx, t, state, b):
    updates, state = tx.update(jax.grad(loss_t)(t, b), state, t)
    return optax.apply_updates(t, updates), state

  t_big, s_big = trainable, big.init(trainable)
  t_acc, s_acc = trainable, accumulated.init(trainable)
  halves = [jax.tree.map(lambda a: a[:8], batch), jax.tree.map(lambda a: a[8:], batch)]
  for _ in range(7):
    t_big, s_big = step(big, t_big, s_big, batch)
    for half in halves:
      t_acc, s_acc = step(accumulated, t_acc, s_acc, half)
  assert int(s_big.rounds_done) == 2 and int(s_acc.inner_opt_state.rounds_done) == 2
  before = _masks(trainable)
  after = _masks(t_big)
  assert any(np.any(before[p] != after[p]) for p in before)  # the rounds did move ranks
  for p in ("l0", "l1", "l2"):
    np.testing.assert_array_equal(_masks(t_acc)[p], after[p])
    np.testing.assert_allclose(t_acc["lora"][p]["B"], t_big["lora"][p]["B"], atol=1e-5)


# --- issue 16: the inner optimizer never changes the mask --------------------------------------


def _manual_loop(opt, steps=50, round_at=25):
  model, variables, batch, loss_fn = _setup()
  frozen, trainable = jaxrank.split_variables(variables)
  loss_t = lambda t, b: loss_fn({**frozen, **t}, b)
  state = opt.init(trainable)
  step = jax.jit(lambda t, s: (lambda u_s: (optax.apply_updates(t, u_s[0]), u_s[1]))(
      opt.update(jax.grad(loss_t)(t, batch), s, t)))
  for i in range(steps):
    trainable, state = step(trainable, state)
    if i + 1 == round_at:
      trainable, state, _, _ = jaxrank.alora_round(
          loss_t, model, trainable, batch, rng=jax.random.key(i), num_prune=2, optimizer=opt,
          opt_state=state)
      masks_after_round = jax.tree.map(np.asarray, trainable["gates"])
  return model, frozen, trainable, masks_after_round, batch


def test_weight_decay_of_the_inner_optimizer_never_changes_the_mask():
  """adamw's decoupled weight decay moves a 0/1 leaf (1 -> 0.95 in 50 steps); the effective
  gate is its sign, so the function and the rank pattern stay the mask's, and a round writes
  exact 0/1 again."""
  opt = optax.adamw(1e-2, weight_decay=0.1)
  model, frozen, trainable, after_round, batch = _manual_loop(opt)
  for leaf in jax.tree.leaves(after_round):
    assert set(np.unique(leaf)) <= {0.0, 1.0}
  exact = {**trainable, "gates": jax.tree.map(lambda m: (m != 0).astype(m.dtype),
                                              trainable["gates"])}
  np.testing.assert_array_equal(model.apply({**frozen, **trainable}, batch[0]),
                                model.apply({**frozen, **exact}, batch[0]))
  assert (jaxrank.rank_pattern(model, trainable)
          == jaxrank.rank_pattern(model, {**trainable, "gates": after_round}))


def test_freeze_masks_keeps_the_mask_leaf_bit_exact():
  opt = jaxrank.alora_freeze_masks(optax.adamw(1e-2, weight_decay=0.1))
  _, _, trainable, after_round, _ = _manual_loop(opt)
  for got, want in zip(jax.tree.leaves(trainable["gates"]), jax.tree.leaves(after_round)):
    np.testing.assert_array_equal(got, want)
