"""SoRA: gated adapter, proximal gate step, official-code compat, scheduler, post-pruning."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jaxrank
import scan_models
import jaxrank

PLANTED = {"first": 1, "second": 3, "third": 0}


class Heads(nn.Module):
  """Three independent linear layers on the same input: each layer's update is identifiable."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([nn.Dense(6, name=n)(x) for n in PLANTED], axis=-1)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(8, name="hidden")(x))
    return nn.Dense(3, name="out")(x)


def planted_task(seed, rank=6, n=256, dim=8):
  """A frozen random base, a teacher = base + ΔW of planted rank per layer, a SoRA student."""
  base = Heads()
  x = jax.random.normal(jax.random.key(1000 + seed), (n, dim))
  params = base.init(jax.random.key(seed), x)["params"]
  teacher = dict(params)
  key = jax.random.key(10 + seed)
  for name, r in PLANTED.items():
    if r == 0:
      continue
    kernel = params[name]["kernel"]
    key, ku, kv = jax.random.split(key, 3)
    u = jnp.linalg.qr(jax.random.normal(ku, (kernel.shape[0], r)))[0]
    v = jnp.linalg.qr(jax.random.normal(kv, (kernel.shape[1], r)))[0]
    delta = (u * jnp.linspace(1.5, 0.75, r)) @ v.T  # singular values 1.5 .. 0.75
    teacher[name] = {**params[name], "kernel": kernel + delta}
  y = base.apply({"params": teacher}, x)
  model = jaxrank.wrap(base, adapter=jaxrank.SoRA(rank=rank, alpha=rank))
  variables = {**model.init(jax.random.key(100 + seed), x), "params": params}
  return model, variables, x, y, lambda inputs: base.apply({"params": teacher}, inputs)


def mse_fn(model, frozen, x, y):
  return lambda trainable: jnp.mean((model.apply({**frozen, **trainable}, x) - y) ** 2)


def train(tx, loss, trainable, steps):
  @jax.jit
  def step(carry, _):
    trainable, state = carry
    grads = jax.grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return (optax.apply_updates(trainable, updates), state), None

  (trainable, _), _ = jax.lax.scan(step, (trainable, tx.init(trainable)), None, length=steps)
  return trainable


def eq11(x, xi):
  """Direct transcription of eq. 11, element by element."""
  out = np.empty_like(x)
  for i, v in enumerate(x):
    if v > xi:
      out[i] = v - xi
    elif v <= -xi:
      out[i] = v + xi
    else:
      out[i] = 0.0
  return out


def official_masks(p, xi):
  """Direct transcription of SparseAdamW's three masked assignments (torch in-place)."""
  p = p.copy()
  p[p > xi] -= xi
  p[p < -xi] += xi
  p[abs(p) < xi] = 0.0
  return p


floats = st.floats(-10, 10, width=32, allow_subnormal=False)
vectors = hnp.arrays(np.float32, st.integers(1, 12), elements=floats)
positive = st.floats(0, 5, width=32, allow_subnormal=False)


# --- operators ------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(vectors, positive)
def test_soft_threshold_is_eq11(x, xi):
  got = jax.jit(jaxrank.soft_threshold)(x, xi)
  np.testing.assert_array_equal(np.asarray(got), eq11(x, np.float32(xi)))


@settings(max_examples=50, deadline=None)
@given(vectors, positive)
def test_official_threshold_is_the_sequential_masks(x, xi):
  got = jax.jit(jaxrank.sora_official_threshold)(x, xi)
  np.testing.assert_array_equal(np.asarray(got), official_masks(x, np.float32(xi)))


def test_official_threshold_differs_from_soft_threshold_as_documented():
  x = np.arange(-3.0, 3.5, 0.5, dtype=np.float32)
  got = np.asarray(jaxrank.sora_official_threshold(x, 1.0)).tolist()
  # methods.md §2.3, verified there numerically against the torch code
  assert got == [-2, -1.5, -1, 0, -1, 0, 0, 0, 1, 0, 1, 1.5, 2]
  assert not np.array_equal(got, eq11(x, np.float32(1.0)))


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float32, 5, elements=floats),
    hnp.arrays(np.float32, 5, elements=floats),
    st.floats(2.0**-10, 1.0, width=32),
    positive,
)
def test_prox_step_is_soft_threshold_of_the_chain_update(gate, update, lr, lam):
  """g_{t+1} = T_{η·λ}(g_t + u_t) for gate leaves; every other leaf passes unchanged."""
  # full variables: a frozen base leaf named like a gate must not be touched either
  params = {"params": {"a": {"g": jnp.asarray(gate)}}, "lora": {"a": {"A": jnp.ones((2, 5))}},
            "gates": {"a": {"g": jnp.asarray(gate)}}}
  lora_update = jnp.asarray(np.arange(10, dtype=np.float32).reshape(2, 5))
  updates = {"params": {"a": {"g": jnp.asarray(update)}}, "lora": {"a": {"A": lora_update}},
             "gates": {"a": {"g": jnp.asarray(update)}}}
  tx = jaxrank.sora_prox(lam, lr)

  @jax.jit
  def run(updates, params):
    new_updates, _ = tx.update(updates, tx.init(params), params)
    return new_updates, optax.apply_updates(params, new_updates)

  new_updates, new_params = run(updates, params)
  expected = eq11((gate + update).astype(np.float32), np.float32(lr) * np.float32(lam))
  got = np.asarray(new_params["gates"]["a"]["g"])
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=2e-6)
  assert np.all(got[expected == 0] == 0.0), "zeroed gates must be exactly 0"
  np.testing.assert_array_equal(new_updates["lora"]["a"]["A"], lora_update)
  np.testing.assert_array_equal(new_updates["params"]["a"]["g"], update)


# --- the adapter ------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_init", ["ones", "normal"])
def test_gate_init_and_identity_at_init(gate_init):
  model = jaxrank.wrap(MLP(), adapter=jaxrank.SoRA(rank=4, gate_init=gate_init))
  x = jax.random.normal(jax.random.key(1), (5, 4))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  gates = variables["gates"]["hidden"]["g"]
  assert gates.shape == (4,)
  if gate_init == "ones":
    np.testing.assert_array_equal(gates, np.ones(4))
  else:
    assert not np.allclose(gates, 1.0) and np.any(gates < 0), "standard normal, can be negative"
  base_out = MLP().apply({"params": variables["params"]}, x)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), base_out, atol=1e-6)
  with pytest.raises(ValueError, match="gate_init"):
    jaxrank.SoRA(gate_init="zeros")


def test_gate_multiplies_each_rank():
  """z = scale · W_u (g ⊙ (W_d x)) (eq. 9), checked against a direct computation."""
  model = jaxrank.wrap(nn.Dense(3), adapter=jaxrank.SoRA(rank=4, alpha=8.0))
  x = jax.random.normal(jax.random.key(1), (5, 6))
  variables = model.init(jax.random.key(0), x)
  lora = {"A": jax.random.normal(jax.random.key(2), (6, 4)),
          "B": jax.random.normal(jax.random.key(3), (4, 3))}
  g = jnp.array([0.5, 0.0, -2.0, 1.0])
  variables = {**variables, "lora": lora, "gates": {"g": g}}
  base = x @ variables["params"]["kernel"] + variables["params"]["bias"]
  expected = base + 2.0 * ((x @ lora["A"]) * g) @ lora["B"]
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)
  assert jaxrank.rank_pattern(model, variables) == {"": 3}


# --- errors -------------------------------------------------------------------------------------
def test_errors_name_the_fix():
  params = {"lora": {"A": jnp.ones(3)}, "gates": {"g": jnp.ones(3)}}
  tx = jaxrank.sora_prox(0.1, 0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params), None)
  with pytest.raises(ValueError, match="no SoRA gate"):
    tx.init({"lora": {"A": jnp.ones(3)}})
  with pytest.raises(ValueError, match="no SoRA gate"):
    tx.update({"lora": {"A": jnp.ones(3)}}, tx.init(params), {"lora": {"A": jnp.ones(3)}})
  with pytest.raises(ValueError, match="learning_rate"):
    jaxrank.sora_prox(0.1)
  with pytest.raises(ValueError, match="compat"):
    jaxrank.sora_prox(0.1, 0.1, compat="torch")
  with pytest.raises(ValueError, match="non-negative"):
    jaxrank.sora_prox(-1.0, 0.1)
  with pytest.raises(ValueError, match="no SoRA gate"):
    jaxrank.sora_l1_penalty({"lora": {"A": jnp.ones(3)}})
  # a tree holding only the gates collection works with collection=None
  only_gates = {"layer": {"g": jnp.array([0.3, -0.01])}}
  tx = jaxrank.sora_prox(0.1, 0.1, collection=None)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, only_gates), tx.init(only_gates), only_gates)
  np.testing.assert_allclose(optax.apply_updates(only_gates, updates)["layer"]["g"], [0.29, 0.0])


# --- composition ----------------------------------------------------------------------------
def small_problem(seed=0):
  # official N(0, 1) gate init: some gates start near zero, so a few steps can zero them
  model = jaxrank.wrap(MLP(), adapter=jaxrank.SoRA(rank=4, gate_init="normal"))
  x = jax.random.normal(jax.random.key(seed), (12, 4))
  variables = model.init(jax.random.key(seed + 1), x)
  # non-zero up factors so the gates receive gradient
  variables["lora"] = jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.key(seed + 2), a.shape), variables["lora"])
  y = jax.random.normal(jax.random.key(seed + 3), (12, 3))
  return model, variables, x, y


def test_chain_after_adamw_thresholds_adamw_update_and_keeps_factors():
  model, variables, x, y = small_problem()
  frozen, trainable = jaxrank.split_variables(variables)
  loss = mse_fn(model, frozen, x, y)
  lr, lam = 0.05, 0.8
  adamw = optax.adamw(lr, weight_decay=0.1)
  tx = optax.chain(optax.adamw(lr, weight_decay=0.1), jaxrank.sora_prox(lam, lr))

  @jax.jit
  def both(trainable, s_tx, s_ref):
    grads = jax.grad(loss)(trainable)
    u, s_tx = tx.update(grads, s_tx, trainable)
    u_ref, s_ref = adamw.update(grads, s_ref, trainable)
    return optax.apply_updates(trainable, u), u_ref, s_tx, s_ref

  s_tx, s_ref = tx.init(trainable), adamw.init(trainable)
  zeros = 0
  for _ in range(5):
    new, u_ref, s_tx, s_ref = both(trainable, s_tx, s_ref)
    plain = optax.apply_updates(trainable, u_ref)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 new["lora"], plain["lora"])  # untouched up to XLA fusion rounding
    for layer in new["gates"]:
      expected = eq11(np.asarray(trainable["gates"][layer]["g"] + u_ref["gates"][layer]["g"]),
                      np.float32(lr * lam))
      np.testing.assert_allclose(new["gates"][layer]["g"], expected, rtol=1e-6, atol=1e-7)
      zeros += int(np.sum(expected == 0))
    trainable = new
  assert zeros > 0, "λ must be large enough that this test sees a thresholded gate"


def test_full_variables_and_partition_paper_recipe():
  """sora_optimizer = partition(params: zero, lora: inner, gates: sgd → prox), on full variables."""
  model, variables, x, y = small_problem(1)
  lr, gate_lr, lam = 0.01, 0.5, 0.4
  tx = jaxrank.sora_optimizer(optax.adam(lr), lam, gate_lr)
  inner = optax.adam(lr)
  loss = lambda v: jnp.mean((model.apply(v, x) - y) ** 2)

  @jax.jit
  def step(v, state, s_inner):
    grads = jax.grad(loss)(v)
    u, state = tx.update(grads, state, v)
    u_inner, s_inner = inner.update(grads["lora"], s_inner, v["lora"])
    return optax.apply_updates(v, u), state, grads, optax.apply_updates(v["lora"], u_inner), s_inner

  state, s_inner = tx.init(variables), inner.init(variables["lora"])
  for _ in range(3):
    new, state, grads, lora_ref, s_inner = step(variables, state, s_inner)
    jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
                 new["lora"], lora_ref)
    for layer in new["gates"]:
      stepped = np.asarray(variables["gates"][layer]["g"] - gate_lr * grads["gates"][layer]["g"])
      np.testing.assert_allclose(new["gates"][layer]["g"], eq11(stepped, np.float32(gate_lr * lam)),
                                 rtol=1e-6, atol=1e-7)  # eq. 10 with plain SGD
    variables = new


def test_inject_hyperparams_schedules_and_changes():
  model, variables, x, y = small_problem(2)
  frozen, trainable = jaxrank.split_variables(variables)
  loss = mse_fn(model, frozen, x, y)
  lam = optax.linear_schedule(0.0, 2.0, 4)
  lr = optax.exponential_decay(0.1, 1, 0.7)
  plain = optax.chain(optax.sgd(lr), jaxrank.sora_prox(lam, lr))
  injected = optax.chain(optax.sgd(lr), optax.inject_hyperparams(jaxrank.sora_prox)(lam=lam, learning_rate=lr))
  a = train(plain, loss, trainable, 6)
  b = train(injected, loss, trainable, 6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), a, b)

  # a hyperparameter changed in the state takes effect without recompiling the transform
  tx = optax.chain(optax.sgd(0.1), optax.inject_hyperparams(jaxrank.sora_prox)(lam=0.0, learning_rate=0.1))
  state = tx.init(trainable)
  step = jax.jit(lambda t, s: tx.update(jax.grad(loss)(t), s, t))
  updates, _ = step(trainable, state)
  assert all(np.all(np.asarray(g["g"]) != 0)
             for g in optax.apply_updates(trainable, updates)["gates"].values())
  state[1].hyperparams["lam"] = jnp.asarray(1e3)
  updates, _ = step(trainable, state)
  for g in optax.apply_updates(trainable, updates)["gates"].values():
    np.testing.assert_array_equal(g["g"], 0.0)


def test_multisteps_equals_big_batch():
  """k micro-batches under optax.MultiSteps == one step on the concatenated batch."""
  model, variables, x, y = small_problem(3)
  frozen, trainable = jaxrank.split_variables(variables)
  k = 3
  lr = optax.linear_schedule(0.05, 0.01, 4)  # the prox must count optimizer steps, not micro-steps
  make = lambda: optax.chain(optax.adamw(lr, weight_decay=0.05), jaxrank.sora_prox(0.6, lr))
  big, multi = make(), optax.MultiSteps(make(), every_k_schedule=k)
  big_loss = mse_fn(model, frozen, x, y)
  xs, ys = x.reshape(k, -1, x.shape[-1]), y.reshape(k, -1, y.shape[-1])

  @jax.jit
  def big_step(t, s):
    u, s = big.update(jax.grad(big_loss)(t), s, t)
    return optax.apply_updates(t, u), s

  @jax.jit
  def micro_step(t, s, xb, yb):
    u, s = multi.update(jax.grad(mse_fn(model, frozen, xb, yb))(t), s, t)
    return optax.apply_updates(t, u), s

  t_big, s_big = trainable, big.init(trainable)
  t_multi, s_multi = trainable, multi.init(trainable)
  for _ in range(4):
    t_big, s_big = big_step(t_big, s_big)
    for i in range(k):
      t_multi, s_multi = micro_step(t_multi, s_multi, xs[i], ys[i])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), t_multi, t_big)
  zero = [np.asarray(g["g"]) == 0 for g in t_big["gates"].values()]
  assert any(z.any() for z in zero), "the threshold must zero some gate in this test"
  for a, b in zip(jax.tree.leaves(t_big["gates"]), jax.tree.leaves(t_multi["gates"])):
    np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)


# --- the official code --------------------------------------------------------------------------
def sparse_adamw_numpy(gate, grads, lr_at, xi, b1=0.9, b2=0.999, eps=1e-6):
  """Transcription of the official SparseAdamW.step (weight_decay 0, correct_bias True)."""
  p = gate.astype(np.float32).copy()
  exp_avg, exp_avg_sq = np.zeros_like(p), np.zeros_like(p)
  for t, grad in enumerate(grads, start=1):
    exp_avg = b1 * exp_avg + (1 - b1) * grad
    exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * grad * grad
    denom = np.sqrt(exp_avg_sq) + eps
    step_size = lr_at(t - 1) * np.sqrt(1 - b2**t) / (1 - b1**t)
    p = (p + exp_avg / denom * (-step_size)).astype(np.float32)
    if xi > 0:
      p[p > xi] -= xi
      p[p < -xi] += xi
      p[abs(p) < xi] = 0.0
  return p


def test_official_compat_matches_sparse_adamw_transcription():
  rng = np.random.default_rng(0)
  gate = rng.standard_normal(16).astype(np.float32)  # official init: N(0, 1)
  grads = rng.standard_normal((25, 16)).astype(np.float32)
  schedule = optax.linear_schedule(0.05, 0.0, 25)  # official: linear decay of the gate lr
  xi = 0.02
  tx = jaxrank.sora_optimizer(optax.adamw(1e-3), xi, schedule, compat="official")
  params = {"lora": {"A": jnp.zeros(2)}, "gates": {"g": jnp.asarray(gate)}}

  @jax.jit
  def step(params, state, g):
    grads = {"lora": {"A": jnp.zeros(2)}, "gates": {"g": g}}
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, jnp.asarray(g))
  expected = sparse_adamw_numpy(gate, grads, lambda t: float(schedule(t)), xi)
  got = np.asarray(params["gates"]["g"])
  np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_array_equal(got == 0, expected == 0)
  assert np.sum(expected == 0) > 0, "the test must exercise the dead zone"


def test_l1_penalty_matches_official_loss_term():
  model, variables, _, _ = small_problem(4)
  gates = [np.asarray(g["g"]) for g in variables["gates"].values()]
  total = sum(np.abs(g).sum() for g in gates)
  count = sum(g.size for g in gates)
  np.testing.assert_allclose(jaxrank.sora_l1_penalty(variables), total, rtol=1e-6)
  _, trainable = jaxrank.split_variables(variables)
  np.testing.assert_allclose(jaxrank.sora_l1_penalty(trainable, reduction="mean"), total / count,
                             rtol=1e-6)
  grad = jax.jit(jax.grad(lambda t: jaxrank.sora_l1_penalty(t, reduction="mean")))(trainable)
  for layer, g in grad["gates"].items():
    np.testing.assert_allclose(g["g"], np.sign(variables["gates"][layer]["g"]) / count, rtol=1e-6)
  jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0.0), grad["lora"])


# --- the planted-rank toy: sparsity, surviving ranks, post-pruning -------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_planted_ranks_are_recovered_and_compact_is_exact(seed):
  model, variables, x, y, _ = planted_task(seed)
  frozen, trainable = jaxrank.split_variables(variables)
  loss = mse_fn(model, frozen, x, y)
  steps = 1500
  tx = jaxrank.sora_optimizer(
      optax.adamw(optax.cosine_decay_schedule(1e-2, steps), weight_decay=0.1),
      lam=0.05, gate_learning_rate=optax.cosine_decay_schedule(0.1, steps))
  initial = float(loss(trainable))
  trainable = train(tx, loss, trainable, steps)
  final = float(loss(trainable))
  trained = jaxrank.join_variables(frozen, trainable)

  assert jaxrank.rank_pattern(model, trained) == PLANTED
  for name, r in PLANTED.items():
    g = np.asarray(trained["gates"][name]["g"])
    assert np.sum(g == 0.0) == 6 - r  # exact zeros, not small values
  assert final < 3e-3 * initial, (initial, final)

  lora_model, lora_vars, pattern = jaxrank.compact(model, trained)
  assert pattern == PLANTED
  assert "gates" not in lora_vars
  for name, r in PLANTED.items():
    assert lora_vars["lora"][name]["A"].shape == (8, r)
    assert lora_vars["lora"][name]["B"].shape == (r, 6)
  x_test = jax.random.normal(jax.random.key(99), (32, 8))
  gated = jax.jit(model.apply)(trained, x_test)
  compacted = jax.jit(lora_model.apply)(lora_vars, x_test)
  np.testing.assert_allclose(compacted, gated, rtol=1e-5, atol=1e-5)
  assert jaxrank.effective_parameter_count(model, trained) == 4 * (8 + 6)


# --- the sparsifying scheduler --------------------------------------------------------------------
def test_lambda_values_follow_the_official_lists():
  np.testing.assert_allclose(jaxrank.sora_lambda_values(0.0, 7e-4, 7), np.linspace(0.0, 7e-4, 7))
  np.testing.assert_allclose(jaxrank.sora_lambda_values(0.1, 1.0, 4, "log_linear"),
                             np.log(np.linspace(np.exp(0.1), np.exp(1.0), 4)))
  np.testing.assert_allclose(jaxrank.sora_lambda_values(1e-4, 1e-2, 3, "exp_linear"), [1e-4, 1e-3, 1e-2])
  with pytest.raises(ValueError, match="kind"):
    jaxrank.sora_lambda_values(0.0, 1.0, 3, "cosine")


def test_sparsifying_scheduler_reports_each_phase():
  model, variables, x, y, teacher = planted_task(2)
  frozen, _ = jaxrank.split_variables(variables)
  loss = mse_fn(model, frozen, x, y)
  x_eval = jax.random.normal(jax.random.key(5), (64, 8))  # held-out inputs
  eval_loss = mse_fn(model, frozen, x_eval, teacher(x_eval))
  calls = []

  def train_phase(variables, lam, phase):
    calls.append((phase, lam))
    _, trainable = jaxrank.split_variables(variables)
    # a fresh optimizer (and learning-rate schedule) per phase
    tx = jaxrank.sora_optimizer(optax.adamw(1e-2, weight_decay=0.1), lam, 0.1)
    return jaxrank.join_variables(frozen, train(tx, loss, trainable, 400))

  logged = []
  lams = [0.0, 0.05, 0.1, 0.2]
  reports = jaxrank.sparsifying_scheduler(
      model, variables, lams, train_phase,
      train_metric=lambda v: loss(jaxrank.split_variables(v)[1]),
      eval_metric=lambda v: eval_loss(jaxrank.split_variables(v)[1]),
      on_phase=logged.append)
  assert calls == list(enumerate(lams))
  assert logged == reports and [r.lam for r in reports] == lams
  for r in reports:
    gates = np.concatenate([np.asarray(g["g"]) for g in r.variables["gates"].values()])
    assert r.sparsity == pytest.approx(np.mean(gates == 0.0))
    assert r.rank_pattern == jaxrank.rank_pattern(model, r.variables)
    _, t = jaxrank.split_variables(r.variables)
    assert r.train_metric == pytest.approx(float(loss(t)), rel=1e-5)
    assert r.eval_metric == pytest.approx(float(eval_loss(t)), rel=1e-5)
  assert reports[0].sparsity == 0.0  # λ = 0: a dense phase
  sparsity = [r.sparsity for r in reports]
  assert sparsity == sorted(sparsity) and sparsity[1] > 0.0, sparsity
  assert reports[-1].train_metric > reports[0].train_metric  # sparser costs fit
  assert reports[-1].rank_pattern == PLANTED  # dense → progressively sparser reaches the plant
  with pytest.raises(ValueError, match="non-negative"):
    jaxrank.sparsifying_scheduler(model, variables, [-1.0], train_phase,
                               train_metric=float, eval_metric=float)






def test_scanned_layers_prox_and_compact():
  """Stacked gates (nn.scan): the prox is elementwise; compact keeps ranks alive in any copy."""
  model = jaxrank.wrap(scan_models.Scanned(), adapter=jaxrank.SoRA(rank=4))
  x = jax.random.normal(jax.random.key(0), (5, 6))
  variables = model.init(jax.random.key(1), x)
  assert variables["gates"]["layers"]["mix"]["g"].shape == (3, 4)
  variables["lora"] = jax.tree.map(
      lambda a: jax.random.normal(jax.random.key(2), a.shape) * 0.3, variables["lora"])
  g = jnp.array([[0.5, 0.05, 0.0, -0.8], [0.02, 0.0, 0.0, 1.0], [0.3, 0.0, 0.0, 0.01]])
  tx = jaxrank.sora_prox(0.5, 0.2)  # threshold 0.1
  _, trainable = jaxrank.split_variables({**variables, "gates": {"layers": {"mix": {"g": g}}}})
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(trainable), trainable)
  trained = jaxrank.join_variables(variables, optax.apply_updates(trainable, updates))
  new_g = np.asarray(trained["gates"]["layers"]["mix"]["g"])
  np.testing.assert_allclose(new_g, eq11(np.asarray(g).ravel(), np.float32(0.1)).reshape(3, 4),
                             atol=1e-7)
  assert jaxrank.rank_pattern(model, trained) == {"layers/mix": [2, 1, 1]}
  lora_model, lora_vars, pattern = jaxrank.compact(model, trained)
  assert pattern == {"layers/mix": 2}  # ranks 0 and 3 are alive in some copy
  np.testing.assert_allclose(jax.jit(lora_model.apply)(lora_vars, x),
                             jax.jit(model.apply)(trained, x), rtol=1e-5, atol=1e-5)
