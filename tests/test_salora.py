"""SaLoRA: hard-concrete gates, E[L0], density, Lagrangian ascent, window, hardening, compact."""

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrank
import scan_models
import jaxrank


class MLP(nn.Module):
  """Four 16-wide Dense layers (tanh between), the planted-rank toy's base."""

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = jnp.tanh(nn.Dense(16, name=f"dense{i}")(x))
    return nn.Dense(16, name="dense3")(x)


class Uneven(nn.Module):
  """Layers of different widths, so parameter weighting matters."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="b")(jnp.tanh(nn.Dense(12, name="a")(x)))


class Twin(nn.Module):
  """Two layers applied to the same input (to compare their gate samples)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="left")(x), nn.Dense(4, name="right")(x)






def _init(module, spec, in_dim, key=0):
  model = jaxrank.wrap(module, adapter=spec)
  variables = model.init(jax.random.key(key), jnp.ones((1, in_dim)))
  return model, jaxrank.add_lagrange_multiplier(variables)


def _set_log_theta(variables, fn):
  gates = jax.tree_util.tree_map_with_path(
      lambda p, x: fn(x) if p[-1].key == "log_theta" else x, variables["gates"]
  )
  return {**variables, "gates": gates}


def _random_log_theta(variables, key, scale=4.0):
  leaves = []
  def draw(x):
    leaves.append(None)
    return scale * jax.random.normal(jax.random.fold_in(key, len(leaves)), x.shape)
  return _set_log_theta(variables, draw)


def _random_up(variables, key):
  lora = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, x.size), x.shape)
                      * 0.3, variables["lora"])
  return {**variables, "lora": lora}


# --- the distribution --------------------------------------------------------------------
@pytest.mark.parametrize("temperature,gamma,zeta", [(2 / 3, -0.1, 1.1), (1.0, -0.2, 1.05)])
def test_closed_form_expected_l0_matches_monte_carlo(temperature, gamma, zeta):
  spec = jaxrank.SaLoRA(rank=5, temperature=temperature, gamma=gamma, zeta=zeta)
  log_theta = jnp.array([-2.5, -1.0, 0.0, 1.0, 3.0])
  n = 400_000
  sample = jax.jit(lambda k: spec.sample(jnp.broadcast_to(log_theta, (n, 5)), k))
  gates = sample(jax.random.key(0))
  assert float(gates.min()) >= 0.0 and float(gates.max()) <= 1.0
  monte_carlo = np.asarray(jnp.mean(gates > 0, axis=0))
  closed = np.asarray(spec.open_probability(log_theta))
  np.testing.assert_allclose(monte_carlo, closed, rtol=0.01)  # per gate, within 1 %
  # E[||G||_0] of the whole layer (eq. 8) against the Monte Carlo count of open gates
  mc_l0 = float(jnp.mean(jnp.sum(gates > 0, axis=-1)))
  assert abs(mc_l0 - float(closed.sum())) <= 0.01 * float(closed.sum())
  # exact zeros and ones carry real mass (the point of stretching)
  assert float(jnp.mean(gates == 0)) > 0.01 and float(jnp.mean(gates == 1)) > 0.01


def test_expected_l0_per_layer_matches_the_gates_sampled_by_the_model():
  model, variables = _init(Uneven(), jaxrank.SaLoRA(rank=4), 6)
  variables = _random_log_theta(variables, jax.random.key(3), scale=1.5)
  spec = model.adapter
  closed = jaxrank.salora_expected_l0(model, variables)
  layers = jaxrank.adapter_layers(model, variables)
  keys = jax.random.split(jax.random.key(1), 100_000)
  for path, layer in layers.items():
    draws = jax.jit(jax.vmap(lambda k: spec.gate(layer.gates, lambda name: k)))(keys)
    assert draws.shape == (100_000, 4)
    np.testing.assert_allclose(float(jnp.mean(jnp.sum(draws > 0, -1))), float(closed[path]),
                               rtol=0.01)


def test_init_gates_start_open_and_defaults():
  spec = jaxrank.SaLoRA(rank=3)
  assert (spec.temperature, spec.gamma, spec.zeta) == (2 / 3, -0.1, 1.1)
  log_theta = spec.init_gates(jax.random.key(0))["log_theta"]
  assert log_theta.shape == (3,)
  np.testing.assert_array_equal(spec.effective_gate({"log_theta": log_theta}), 1.0)
  assert float(spec.open_probability(log_theta)[0]) > 0.98


def test_one_sample_per_batch_and_per_layer_deterministic_without_rng():
  model, variables = _init(Twin(), jaxrank.SaLoRA(rank=8, init_log_theta=0.0), 3)
  # both layers get identical variables, so only their gate samples can differ
  shared = _random_up(variables, jax.random.key(2))["lora"]["left"]
  variables["lora"]["right"] = variables["lora"]["left"] = shared
  variables["params"]["right"] = variables["params"]["left"]
  x = jnp.tile(jax.random.normal(jax.random.key(4), (1, 3)), (5, 1))  # 5 identical examples
  apply = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"hard_concrete": k}))
  left, right = apply(variables, x, jax.random.key(7))
  np.testing.assert_allclose(left, jnp.broadcast_to(left[0], left.shape), rtol=0, atol=0)
  assert not np.allclose(left, right)  # each layer draws its own gates
  left2, _ = apply(variables, x, jax.random.key(8))
  assert not np.allclose(left, left2)  # a new key is a new sample
  # no "hard_concrete" stream: the deterministic gate, as in evaluation
  det_left, det_right = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(det_left, det_right, rtol=1e-6)
  spec = model.adapter
  layer = jaxrank.adapter_layers(model, variables)["left"]
  gate = spec.effective_gate(layer.gates)
  np.testing.assert_allclose(gate, jnp.clip(jax.nn.sigmoid(layer.gates["log_theta"]) * 1.2 - 0.1,
                                            0, 1), rtol=1e-6)
  expected = (x @ variables["params"]["left"]["kernel"]
              + variables["params"]["left"]["bias"]
              + spec.scale * ((x @ layer.down) * gate) @ layer.up)
  np.testing.assert_allclose(det_left, expected, rtol=1e-5, atol=1e-6)


# --- density and the loss helpers ----------------------------------------------------------
def test_expected_density_forms_and_hard_density():
  model, variables = _init(Uneven(), jaxrank.SaLoRA(rank=4), 6)
  variables = _random_log_theta(variables, jax.random.key(0))
  spec = model.adapter
  c = float(jax.jit(lambda v: jaxrank.salora_expected_density(model, v))(variables))
  probs = {k: spec.open_probability(l.gates["log_theta"])
           for k, l in jaxrank.adapter_layers(model, variables).items()}
  weights = {"a": 6 + 12, "b": 12 + 3}
  manual = sum(float(probs[k].sum()) * w for k, w in weights.items()) / (4 * sum(weights.values()))
  assert 0.0 <= c <= 1.0
  np.testing.assert_allclose(c, manual, rtol=1e-6)
  as_written = float(jaxrank.salora_expected_density(model, variables, form="as_written"))
  np.testing.assert_allclose(as_written, sum(float(p.sum()) / 4 for p in probs.values()), rtol=1e-6)
  # once gates are hard, C(Θ) equals the kept fraction of adapter parameters
  for rule in ("budget", "layer", "threshold"):
    hard = jaxrank.salora_harden(model, variables, rule=rule)
    kept = jaxrank.effective_parameter_count(model, hard)
    total = sum(4 * w for w in weights.values())
    assert jaxrank.salora_density(model, hard) == kept / total
    np.testing.assert_allclose(float(jaxrank.salora_expected_density(model, hard)), kept / total,
                               atol=1e-6)
    np.testing.assert_array_equal(  # gates are exactly 0 or 1
        np.isin(np.asarray(jnp.concatenate([m.astype(float) for m in jax.tree.leaves(
            jax.tree.map(lambda l: spec.effective_gate({"log_theta": l}),
                         {k: v["log_theta"] for k, v in hard["gates"].items()
                          if k != "lagrange_multiplier"}))])), [0.0, 1.0]), True)
  budget = jaxrank.salora_harden(model, variables)
  assert abs(jaxrank.salora_density(model, budget) - c) <= 0.5 * 18 / (4 * 33) + 1e-9


def test_penalty_is_orthogonality_plus_lagrangian_term():
  model, variables = _init(Uneven(), jaxrank.SaLoRA(rank=4), 6)
  variables = _random_log_theta(_random_up(variables, jax.random.key(1)), jax.random.key(0))
  variables = jaxrank.add_lagrange_multiplier(variables, 2.5)
  b, beta = 0.3, 0.7
  got = jax.jit(lambda v: jaxrank.salora_penalty(model, v, target_density=b,
                                         orthogonality_weight=beta))(variables)
  c = jaxrank.salora_expected_density(model, variables)
  orth = jaxrank.orthogonality_penalty(model, variables, form="paper")
  np.testing.assert_allclose(float(got), float(beta * orth + 2.5 * (c - b) ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(jaxrank.salora_lagrangian_term(c, 2.5, b)), 2.5 * float(c - b) ** 2,
                             rtol=1e-6)
  # d/dλ of the penalty is (C - b)^2 >= 0
  grad = jax.jit(jax.grad(lambda v: jaxrank.salora_penalty(model, v, target_density=b)))(variables)
  np.testing.assert_allclose(float(grad["gates"]["lagrange_multiplier"]), float(c - b) ** 2,
                             rtol=1e-5)
  # without a multiplier the density constraint cannot be applied: a clear error, not a drop
  no_lambda = {**variables, "gates": {k: v for k, v in variables["gates"].items()
                                      if k != "lagrange_multiplier"}}
  with pytest.raises(ValueError, match="add_lagrange_multiplier"):
    jaxrank.salora_penalty(model, no_lambda, target_density=b)
  # target_density=None asks for the orthogonality term alone
  np.testing.assert_allclose(float(jaxrank.salora_penalty(model, no_lambda, target_density=None,
                                                  orthogonality_weight=beta)),
                             float(beta * orth), rtol=1e-6)


# --- the optimizer ---------------------------------------------------------------------------
def _toy(b=0.25, key=0, eta=1.0, lr_theta=0.1, t_start=100, t_end=600, steps=800,
         extra_weight_decay=0.0):
  """The planted-rank toy: a frozen random MLP, a teacher with ranks (1, 4, 0, 3) added."""
  base = MLP()
  params = base.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  teacher = jax.tree.map(lambda x: x, params)
  rng = np.random.default_rng(key)
  for i, r in enumerate((1, 4, 0, 3)):
    if r:
      delta = rng.normal(size=(16, r)) @ rng.normal(size=(r, 16)) / 8
      kernel = params[f"dense{i}"]["kernel"]
      teacher[f"dense{i}"]["kernel"] = kernel + jnp.asarray(delta, jnp.float32)
  model = jaxrank.wrap(base, adapter=jaxrank.SaLoRA(rank=8, alpha=8.0))
  variables = jaxrank.add_lagrange_multiplier(model.init(jax.random.key(key + 1), jnp.ones((1, 16))))
  variables["params"] = params
  frozen, trainable = jaxrank.split_variables(variables)
  inner = optax.multi_transform(
      {"lora": optax.adam(1e-2), "gates": optax.adamw(lr_theta, weight_decay=extra_weight_decay)},
      jaxrank.collection_labels)
  tx = jaxrank.lagrangian_ascent(eta, inner, t_start=t_start, t_end=t_end, total_steps=steps)

  def loss_fn(tr, x, k):
    v = jaxrank.join_variables(frozen, tr)
    y = model.apply(v, x, rngs={"hard_concrete": k})
    task = jnp.mean(jnp.square(y - base.apply({"params": teacher}, x)))
    return task + jaxrank.salora_penalty(model, v, target_density=b, orthogonality_weight=0.01), task

  @jax.jit
  def step(tr, state, k):
    kx, kg = jax.random.split(k)
    x = jax.random.normal(kx, (64, 16))
    c = jaxrank.salora_expected_density(model, jaxrank.join_variables(frozen, tr))
    (_, task), g = jax.value_and_grad(loss_fn, has_aux=True)(tr, x, kg)
    u, state = tx.update(g, state, tr)
    return optax.apply_updates(tr, u), state, task, c

  return model, base, teacher, frozen, trainable, tx, step


@pytest.mark.parametrize("b", [0.25, 0.5])
def test_toy_reaches_target_density_and_lambda_ascends(b):
  model, base, teacher, frozen, trainable, tx, step = _toy(b=b)
  state = tx.init(trainable)
  lambdas, densities = [0.0], []
  for i in range(800):
    trainable, state, task, c = step(trainable, state, jax.random.key(10_000 + i))
    lambdas.append(float(jaxrank.lagrange_multiplier(trainable)))
    densities.append(float(c))
  lambdas, densities = np.array(lambdas), np.array(densities)
  assert (lambdas >= 0).all()
  window = np.arange(100, 600)
  # inside the window λ grows by exactly η (C - b)^2, so it grows whenever C > b
  growth = lambdas[window + 1] - lambdas[window]
  # (atol: λ ≈ 11 is float32)
  np.testing.assert_allclose(growth, (densities[window] - b) ** 2, rtol=1e-4, atol=2e-6)
  above = densities[window] > b + 1e-3
  assert above.sum() > 10 and (growth[above] > 0).all()
  variables = jaxrank.join_variables(frozen, trainable)
  final_c = float(jaxrank.salora_expected_density(model, variables))
  hard = jaxrank.salora_harden(model, variables)
  final = jaxrank.salora_density(model, hard)
  print(f"C(Θ) = {final_c:.4f}, hardened density = {final}, λ = {lambdas[-1]:.3f}, "
        f"ranks {jaxrank.rank_pattern(model, hard)}, task mse {float(task):.4f}")
  assert abs(final_c - b) <= 0.02
  assert abs(final - b) <= 0.02
  # the compacted plain LoRA computes what the hardened gated model computes
  lora_model, lora_vars, pattern = jaxrank.compact(model, hard)
  assert pattern == jaxrank.rank_pattern(model, hard)
  assert isinstance(lora_model.adapter, jaxrank.LoRA) and "gates" not in lora_vars
  x = jax.random.normal(jax.random.key(5), (32, 16))
  np.testing.assert_allclose(lora_model.apply(lora_vars, x), model.apply(hard, x),
                             rtol=1e-5, atol=1e-5)
  # and the adapters learned something: better than the base model on the teacher
  target = base.apply({"params": teacher}, x)
  assert (float(jnp.mean((model.apply(hard, x) - target) ** 2))
          < 0.5 * float(jnp.mean((base.apply({"params": frozen["params"]}, x) - target) ** 2)))


def test_theta_and_lambda_move_only_inside_the_window():
  t_start, t_end = 3, 6
  model, _, _, frozen, trainable, tx, step = _toy(t_start=t_start, t_end=t_end, steps=10,
                                                  extra_weight_decay=0.1)
  state = tx.init(trainable)
  history = [trainable]
  for i in range(10):
    trainable, state, *_ = step(trainable, state, jax.random.key(i))
    history.append(trainable)
  theta = lambda tr: np.concatenate([np.ravel(v["log_theta"]) for k, v in tr["gates"].items()
                                     if k != "lagrange_multiplier"])
  lam = lambda tr: float(tr["gates"]["lagrange_multiplier"])
  lora = lambda tr: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tr["lora"])])
  for s in range(10):  # step s maps history[s] -> history[s + 1]
    before, after = history[s], history[s + 1]
    inside = t_start <= s < t_end
    assert np.array_equal(theta(before), theta(after)) != inside, s
    assert (lam(before) == lam(after)) != inside, s
    assert not np.array_equal(lora(before), lora(after))  # A, B train at every step


@jax.jit
def _one_ascent_step(lam, grad, eta):
  params = {"gates": {"lagrange_multiplier": lam}, "lora": {"A": jnp.ones(2)}}
  grads = {"gates": {"lagrange_multiplier": grad}, "lora": {"A": jnp.ones(2)}}
  tx = jaxrank.lagrangian_ascent(eta, optax.sgd(0.1), t_start=0, t_end=5, total_steps=5)  # traced η
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates), updates


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    lam=st.floats(0.0, 10.0), grad=st.floats(-100.0, 100.0), eta=st.floats(0.0, 2.0)
)
def test_projected_ascent_step(lam, grad, eta):
  new, updates = _one_ascent_step(jnp.float32(lam), jnp.float32(grad), jnp.float32(eta))
  expected = max(0.0, np.float32(lam) + np.float32(eta) * np.float32(grad))
  assert float(new["gates"]["lagrange_multiplier"]) >= 0.0
  np.testing.assert_allclose(float(new["gates"]["lagrange_multiplier"]), expected,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["lora"]["A"], -0.1)  # the inner optimizer, unchanged


def _grads_and_params(key=0):
  model, variables = _init(Uneven(), jaxrank.SaLoRA(rank=4), 6, key=key)
  variables = _random_up(variables, jax.random.key(key + 5))
  x = jax.random.normal(jax.random.key(key + 9), (8, 6))

  def loss(v, x):
    return jnp.mean(model.apply(v, x) ** 2) + jaxrank.salora_penalty(model, v, target_density=0.3)

  return model, variables, x, loss


def test_optax_composition_inject_partition_multisteps():
  model, variables, x, loss = _grads_and_params()
  frozen, trainable = jaxrank.split_variables(variables)
  full_loss = lambda tr, x: loss(jaxrank.join_variables(frozen, tr), x)
  plain = jaxrank.lagrangian_ascent(0.5, optax.adam(1e-2), t_start=0, t_end=4, total_steps=4)

  def run(tx, tr, batches):
    def step(tr, state, xb):
      u, state = tx.update(jax.grad(full_loss)(tr, xb), state, tr)
      return optax.apply_updates(tr, u), state

    step = jax.jit(step)
    state = tx.init(tr)
    for xb in batches:
      tr, state = step(tr, state, xb)
    return tr

  ref = run(plain, trainable, [x] * 6)
  # inject_hyperparams: static window, and a traced one
  injected = optax.inject_hyperparams(jaxrank.lagrangian_ascent, static_args=("t_start", "t_end", "total_steps"))(
      learning_rate=0.5, inner=optax.adam(1e-2), t_start=0, t_end=4, total_steps=4)
  traced = optax.inject_hyperparams(jaxrank.lagrangian_ascent, static_args=("total_steps",))(
      learning_rate=0.5, inner=optax.adam(1e-2), t_start=0, t_end=4, total_steps=4)
  scheduled = jaxrank.lagrangian_ascent(lambda step: 0.5 + 0.0 * step, optax.adam(1e-2),
                                       t_start=0, t_end=4, total_steps=4)
  chained = optax.chain(optax.clip_by_global_norm(1e6),  # no-op clip: same result
                        jaxrank.lagrangian_ascent(0.5, optax.adam(1e-2), t_start=0, t_end=4, total_steps=4))
  for tx in (injected, traced, scheduled, chained):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 run(tx, trainable, [x] * 6), ref)
  # on full variables inside optax.partition, with params frozen
  part = optax.partition({"params": optax.set_to_zero(), "lora": optax.adam(1e-2),
                          "gates": jaxrank.lagrangian_ascent(0.5, optax.adam(1e-2), t_start=0,
                                                            t_end=4, total_steps=4)},
                         jaxrank.collection_labels)
  @jax.jit
  def part_step(v, state):
    u, state = part.update(jax.grad(loss)(v, x), state, v)
    return optax.apply_updates(v, u), state

  state = part.init(variables)
  v = variables
  for _ in range(6):
    v, state = part_step(v, state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jaxrank.split_variables(v)[1], ref)
  np.testing.assert_array_equal(v["params"]["a"]["kernel"], variables["params"]["a"]["kernel"])
  # optax.MultiSteps over two half batches == one step on the whole batch (steps count
  # optimizer steps, so the window is the same)
  multi = optax.MultiSteps(jaxrank.lagrangian_ascent(0.5, optax.adam(1e-2), t_start=1, t_end=3, total_steps=3),
                           every_k_schedule=2)
  big = jaxrank.lagrangian_ascent(0.5, optax.adam(1e-2), t_start=1, t_end=3, total_steps=3)
  ref_big = run(big, trainable, [x] * 4)
  got = run(multi, trainable, [x[:4], x[4:]] * 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, ref_big)


def test_scan_stacked_layers():
  model, variables = _init(scan_models.Scanned(stack_name="blocks"), jaxrank.SaLoRA(rank=3), 4)
  variables = _random_log_theta(_random_up(variables, jax.random.key(0)), jax.random.key(1))
  assert variables["gates"]["blocks"]["mix"]["log_theta"].shape == (3, 3)
  np.testing.assert_allclose(
      float(jaxrank.salora_expected_density(model, variables)),
      float(jnp.mean(model.adapter.open_probability(
          variables["gates"]["blocks"]["mix"]["log_theta"]))),
      rtol=1e-6)
  assert jaxrank.salora_expected_l0(model, variables)["blocks/mix"].shape == (3,)
  x = jax.random.normal(jax.random.key(2), (5, 4))
  out = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"hard_concrete": k}))(
      variables, x, jax.random.key(3))
  assert out.shape == (5, 4)
  hard = jaxrank.salora_harden(model, variables, rule="layer")
  lora_model, lora_vars, _ = jaxrank.compact(model, hard)
  np.testing.assert_allclose(jax.jit(lora_model.apply)(lora_vars, x), jax.jit(model.apply)(hard, x),
                             rtol=1e-5, atol=1e-5)


def test_compact_of_unhardened_gates_equals_deterministic_model():
  model, variables = _init(Uneven(), jaxrank.SaLoRA(rank=4), 6)
  variables = _random_log_theta(_random_up(variables, jax.random.key(0)), jax.random.key(1),
                                scale=2.0)
  lora_model, lora_vars, pattern = jaxrank.compact(model, variables)
  assert pattern == jaxrank.rank_pattern(model, variables)
  x = jax.random.normal(jax.random.key(2), (5, 6))
  np.testing.assert_allclose(lora_model.apply(lora_vars, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


# --- errors --------------------------------------------------------------------------------
def test_clear_errors():
  inner = optax.adam(1e-3)
  with pytest.raises(ValueError, match="t_start"):
    jaxrank.lagrangian_ascent(0.1, inner, t_start=10, t_end=5, total_steps=5)
  with pytest.raises(ValueError, match="total_steps"):
    jaxrank.lagrangian_ascent(0.1, inner, t_start=10, t_end=500, total_steps=100)
  with pytest.raises(ValueError, match="t_start must be >= 0"):
    jaxrank.lagrangian_ascent(0.1, inner, t_start=-1, t_end=5, total_steps=5)
  with pytest.raises(ValueError, match="learning_rate"):
    jaxrank.lagrangian_ascent(-0.1, inner, t_start=0, t_end=5, total_steps=5)
  with pytest.raises(ValueError, match="gamma"):
    jaxrank.SaLoRA(gamma=0.1)
  with pytest.raises(ValueError, match="zeta"):
    jaxrank.SaLoRA(zeta=1.0)
  with pytest.raises(ValueError, match="temperature"):
    jaxrank.SaLoRA(temperature=0.0)
  model, variables = _init(Uneven(), jaxrank.SaLoRA(rank=4), 6)
  for b in (0.0, 1.5, -0.2):
    with pytest.raises(ValueError, match="target_density"):
      jaxrank.salora_penalty(model, variables, target_density=b)
  jaxrank.salora_penalty(model, variables, target_density=1.5, form="as_written")  # K = 2 matrices
  with pytest.raises(ValueError, match="form"):
    jaxrank.salora_expected_density(model, variables, form="dense")
  with pytest.raises(ValueError, match="rule"):
    jaxrank.salora_harden(model, variables, rule="random")
  tx = jaxrank.lagrangian_ascent(0.1, inner, t_start=0, t_end=5, total_steps=5)
  _, trainable = jaxrank.split_variables(variables)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(trainable, tx.init(trainable))
  plain = jaxrank.wrap(Uneven(), adapter=jaxrank.LoRA(rank=2))
  plain_vars = plain.init(jax.random.key(0), jnp.ones((1, 6)))
  with pytest.raises(TypeError, match="SaLoRA"):
    jaxrank.salora_expected_density(plain, plain_vars)
  with pytest.raises(ValueError, match="add_lagrange_multiplier"):
    jaxrank.lagrange_multiplier(model.init(jax.random.key(0), jnp.ones((1, 6))))
  with pytest.raises(ValueError, match="gates"):
    jaxrank.add_lagrange_multiplier(plain_vars)
