"""The SVD form of live ranks (jaxrank/_orthogonalize.py) and where the methods use it:
ALoRA's rounds, AdaLoRA's mask events, SaLoRA's window start; the restart keeps schedules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxrank
from jaxrank import recipes
from jaxrank._orthogonalize import zero_first_moments
from jaxrank._orthogonalize import svd_form


def _delta(down, up, gate):
  return np.einsum("...ir,...r,...ro->...io", down, gate, up)


@st.composite
def _factors(draw):
  stack = draw(st.sampled_from([(), (2,)]))
  d, k, r = draw(st.integers(2, 6)), draw(st.integers(2, 6)), draw(st.integers(1, 5))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  down = rng.normal(size=stack + (d, r)).astype(np.float32)
  up = rng.normal(size=stack + (r, k)).astype(np.float32)
  live = rng.random(stack + (r,)) < 0.7
  gate = np.where(live, rng.uniform(0.2, 2.0, stack + (r,)), 0.0).astype(np.float32)
  return down, up, gate


@settings(max_examples=60, deadline=None)
@given(_factors(), st.sampled_from(["gate", "factors", "values"]))
def test_svd_form_keeps_the_update_and_dead_slots(factors, split):
  down, up, gate = factors
  if split == "factors":
    gate = (gate != 0).astype(np.float32)  # a 0/1 mask
  new = jax.jit(lambda a, b, g: svd_form(a, b, g, split=split))(down, up, gate)
  a2, b2, g2 = map(np.asarray, new)
  np.testing.assert_allclose(_delta(a2, b2, g2), _delta(down, up, gate), atol=2e-4, rtol=1e-4)
  dead = gate == 0
  np.testing.assert_array_equal(g2[dead], 0)
  np.testing.assert_array_equal(np.moveaxis(a2, -1, 0)[np.moveaxis(dead, -1, 0)],
                                np.moveaxis(down, -1, 0)[np.moveaxis(dead, -1, 0)])
  # each live rank carries one singular value of the update, the largest first
  flat_a = a2.reshape((-1,) + a2.shape[-2:])
  flat_b = b2.reshape((-1,) + b2.shape[-2:])
  flat_g, flat_live = g2.reshape(-1, g2.shape[-1]), ~dead.reshape(-1, dead.shape[-1])
  for a, b, g, live in zip(flat_a, flat_b, flat_g, flat_live):
    carried = np.abs(g) * np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=1)
    sv = np.zeros(int(live.sum()))  # more live ranks than the update's rank: zeros after it
    values = np.linalg.svd((a * g) @ b, compute_uv=False)[:sv.size]
    sv[:values.size] = values
    np.testing.assert_allclose(carried[live], sv, atol=2e-4, rtol=1e-3)


def test_svd_form_values_gives_unit_singular_vectors():
  rng = np.random.default_rng(0)
  down, up = rng.normal(size=(5, 3)), rng.normal(size=(3, 4))
  a, b, g = map(np.asarray, svd_form(jnp.asarray(down, jnp.float32),
                                     jnp.asarray(up, jnp.float32), jnp.ones(3), split="values"))
  np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
  np.testing.assert_allclose(g, np.linalg.svd(down @ up, compute_uv=False)[:3], rtol=1e-5)


def test_svd_form_factors_keeps_a_weak_rank_trainable():
  """A live rank with no update (B = 0) keeps an A of the live columns' scale, not A ≈ 0."""
  down = jnp.asarray(np.random.default_rng(1).normal(size=(4, 2)), jnp.float32)
  up = jnp.zeros((2, 3)).at[0].set(1.0)
  a, b, _ = svd_form(down, up, jnp.ones(2), split="factors")
  norms = np.linalg.norm(np.asarray(a), axis=0)
  assert norms[1] > 0.5 * float(np.linalg.norm(np.asarray(down), axis=0).mean())
  np.testing.assert_allclose(np.asarray(b)[1], 0, atol=1e-6)


def test_svd_form_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="do not match gate"):
    svd_form(jnp.ones((4, 3)), jnp.ones((2, 5)), jnp.ones(3), split="gate")
  with pytest.raises(ValueError, match="split must be one of"):
    svd_form(jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.ones(3), split="svd")


def test_restart_zeroes_first_moments_and_keeps_the_rest():
  """After a rotation only the first moments restart: the schedule goes on (SoRA's and the
  SVD cut's full re-init used to restart the warmup), and a rounding-level gradient moves a
  rounding-level step (a full re-init makes Adam's next step ± lr whatever the gradient)."""
  tx = optax.adam(optax.linear_schedule(1.0, 0.0, 10))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for _ in range(6):
    _, state = tx.update(params, state, params)
  fresh = zero_first_moments(state)
  adam, schedule_state = fresh[0], fresh[-1]
  assert float(jnp.abs(adam.mu["w"]).sum()) == 0 and float(adam.nu["w"][0]) > 0
  assert int(adam.count) == 6 and int(schedule_state.count) == 6
  tiny = {"w": jnp.full(2, 1e-7)}
  step, _ = tx.update(tiny, fresh, params)
  full_reset, _ = tx.update(tiny, tx.init(params), params)
  assert float(jnp.abs(step["w"]).max()) < 1e-5 < float(jnp.abs(full_reset["w"]).max())


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def _split_direction_alora():
  """One matrix whose update ``e0 e0ᵀ`` is split over its two live ranks, one matrix with a
  single real rank; scored as trained, both halves of the split look important."""
  spec = jaxrank.ALoRA(rank=3, initial_rank=2, alpha=2.0)

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="x")(x) + nn.Dense(4, name="y")(x)

  model = jaxrank.wrap(Two(), adapter=spec)
  variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  e = np.eye(4, dtype=np.float32)
  lora = {"x": {"A": jnp.asarray(np.stack([e[0], e[0], e[1]], 1)),
                "B": jnp.asarray(np.stack([e[0], e[0], e[2]], 0) * 0.5)},
          "y": {"A": jnp.asarray(np.stack([e[1], e[2], e[3]], 1)),
                "B": jnp.asarray(np.stack([e[1] * 0.6, e[2] * 1e-3, e[3]], 0) * 0.5)}}
  variables = {**variables, "lora": lora}
  return spec, model, variables


def test_alora_orthogonalize_keeps_the_function_and_isolates_a_split_direction():
  spec, model, variables = _split_direction_alora()
  x = jax.random.normal(jax.random.key(1), (32, 4))
  rotated = jax.jit(lambda v: jaxrank.alora_orthogonalize(spec, v))(variables)
  np.testing.assert_allclose(model.apply(rotated, x), model.apply(variables, x), atol=1e-5)
  np.testing.assert_array_equal(rotated["gates"]["x"]["mask"], variables["gates"]["x"]["mask"])
  target = model.apply(variables, x)
  loss = lambda v, b: jnp.mean((model.apply(v, b) - target) ** 2) + 0.0 * jnp.sum(b)
  as_trained = jaxrank.ablation_scores(loss, spec, variables, x)
  after = jaxrank.ablation_scores(loss, spec, rotated, x)
  # as trained: x's two halves outscore y's tiny rank; in SVD form x's second rank is empty
  assert float(as_trained["x"][1]) > float(as_trained["y"][1])
  assert float(after["x"][1]) < float(after["y"][1])


def _adalora_toy(orthogonalize, target_r=2):
  spec = jaxrank.AdaLoRA(rank=4, alpha=4.0)
  model = jaxrank.wrap(nn.Dense(6), adapter=spec)
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  frozen, trainable = jaxrank.split_variables(variables)
  w = jax.random.normal(jax.random.key(3), (5, 2)) @ jax.random.normal(jax.random.key(4), (2, 6))
  x = jax.random.normal(jax.random.key(5), (64, 5))

  def loss(t):
    return jnp.mean((model.apply({**frozen, **t}, x) - x @ w) ** 2)

  tx = jaxrank.adalora(optax.adam(3e-2), init_r=4, target_r=target_r, tinit=5, tfinal=5,
                       total_step=40, deltaT=5, importance="magnitude", orth_weight=0.0,
                       orthogonalize=orthogonalize)
  state = tx.init(trainable)

  @jax.jit
  def step(t, s):
    updates, s = tx.update(jax.grad(loss)(t), s, t)
    return optax.apply_updates(t, updates), s

  return model, frozen, trainable, state, step, x


def test_adalora_orthogonalize_makes_exact_triplets_at_mask_events():
  model, frozen, trainable, state, step, x = _adalora_toy(True)
  for i in range(11):  # the first mask event is the 11th update (count 10)
    trainable, state = step(trainable, state)
  q = np.asarray(trainable["lora"]["Q"])
  p = np.asarray(trainable["lora"]["P"])
  lam = np.asarray(trainable["gates"]["singular_values"])
  live = lam != 0
  assert int(live.sum()) == 3  # the event's budget
  # right after the event the live triplets are exactly an SVD of the live update
  sv = np.linalg.svd((q[:, live] * lam[live]) @ p[live], compute_uv=False)[:3]
  np.testing.assert_allclose(np.sort(np.abs(lam[live]))[::-1], sv, rtol=1e-4)
  np.testing.assert_allclose(q[:, live].T @ q[:, live], np.eye(3), atol=1e-5)
  np.testing.assert_allclose(p[live] @ p[live].T, np.eye(3), atol=1e-5)


def test_adalora_rotation_does_not_change_the_function():
  """On the event step, rotating the stepped triplets changes nothing the model computes
  (budget = capacity, so the event masks nothing)."""
  outs = {}
  for orthogonalize in (False, True):
    model, frozen, trainable, state, step, x = _adalora_toy(orthogonalize, target_r=4)
    for _ in range(11):
      trainable, state = step(trainable, state)
    outs[orthogonalize] = model.apply({**frozen, **trainable}, x)
  np.testing.assert_allclose(outs[True], outs[False], atol=1e-4)


def test_salora_rotation_at_window_start_keeps_the_function():
  spec = jaxrank.SaLoRA(rank=4, alpha=4.0)
  model = jaxrank.wrap(nn.Dense(6), adapter=spec)
  variables = jaxrank.add_lagrange_multiplier(model.init(jax.random.key(0), jnp.ones((1, 5))))
  frozen, trainable = jaxrank.split_variables(variables)
  x = jax.random.normal(jax.random.key(5), (64, 5))
  y = jax.random.normal(jax.random.key(6), (64, 6))

  def run(orthogonalize, steps):
    tx = jaxrank.lagrangian_ascent(0.1, optax.adam(1e-2), t_start=3, t_end=8, total_steps=10,
                                   orthogonalize=orthogonalize)
    t, s = trainable, tx.init(trainable)
    apply = lambda t: model.apply({**frozen, **t}, x)
    for _ in range(steps):
      grads = jax.grad(lambda t: jnp.mean((apply(t) - y) ** 2))(t)
      updates, s = tx.update(grads, s, t)
      t = optax.apply_updates(t, updates)
    return t, apply(t)

  plain, out_plain = run(False, 3)  # step t_start − 1 = 2 is the rotation step
  rotated, out_rotated = run(True, 3)
  np.testing.assert_allclose(out_rotated, out_plain, atol=1e-5)
  a = np.asarray(rotated["lora"]["A"])
  gram = a.T @ a
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-5)  # orthogonal columns
  assert not np.allclose(np.asarray(plain["lora"]["A"]), a)


@pytest.mark.parametrize("name", ["alora", "adalora", "salora"])
def test_recipes_keep_the_papers_form_by_default_and_orthogonalize_on_request(name):
  import inspect
  signature = inspect.signature(recipes.RECIPES[name])
  assert signature.parameters["orthogonalize"].default is False
  assert recipes.recipe(name, rank=4, budget_rank=2, orthogonalize=True).name == name
