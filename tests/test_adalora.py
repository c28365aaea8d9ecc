"""AdaLoRA: SVD adapter, orthogonality penalty, budget schedule, the optax wrapper."""

import importlib.util
import pathlib
import types

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
from jaxrank import AdaLoRA, adalora, adalora_budget_schedule as budget_schedule, find_adalora_state as find_state
from jaxrank import adalora_rank_pattern as rank_pattern_from_state


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(12, name="hidden")(x))
    return nn.Dense(5, name="out")(x)


def _setup(rank=4, alpha=8.0, seed=0):
  model = jaxrank.wrap(MLP(), adapter=AdaLoRA(rank=rank, alpha=alpha))
  variables = model.init(jax.random.key(seed), jnp.ones((1, 6)))
  return model, variables


def _with_singular_values(variables, seed=1):
  gates = jax.tree.map(lambda g: jax.random.normal(jax.random.key(seed), g.shape),
                       variables["gates"])
  return {**variables, "gates": gates}


def _loss_fn(model, frozen):
  def loss(trainable, x, y):
    variables = {**frozen, **trainable}
    mse = jnp.mean((model.apply(variables, x) - y) ** 2)
    return mse + 0.1 * jaxrank.orthogonality_penalty(model, variables)
  return loss


def _data(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n, 5)).astype(np.float32))


# --- the adapter spec -------------------------------------------------------------------------


def test_adapter_layout_init_and_identity_at_start():
  model, variables = _setup(rank=4)
  assert variables["lora"]["hidden"]["Q"].shape == (6, 4)  # Q^T: (*in_shape, r)
  assert variables["lora"]["hidden"]["P"].shape == (4, 12)  # P^T: (r, *out_shape)
  np.testing.assert_array_equal(variables["gates"]["hidden"]["singular_values"], np.zeros(4))
  base = MLP().apply({"params": variables["params"]}, jnp.ones((2, 6)))
  np.testing.assert_array_equal(model.apply(variables, jnp.ones((2, 6))), base)
  # Gaussian std 0.02 (PEFT's reset_lora_parameters)
  big = jaxrank.wrap(nn.Dense(64), adapter=AdaLoRA(rank=8)).init(jax.random.key(0), jnp.ones((1, 64)))
  for factor in ("Q", "P"):
    std = float(jnp.std(big["lora"][factor]))
    assert 0.018 < std < 0.022, (factor, std)


def test_scale_is_peft_alpha_over_ranknum_plus_eps():
  assert AdaLoRA(rank=4, alpha=8.0).scale == 8.0 / (4 + 1e-5)
  assert AdaLoRA(rank=12, alpha=0.0).scale == 12.0 / (12 + 1e-5)  # PEFT: alpha <= 0 -> r


def test_forward_is_base_plus_scaled_p_lambda_q():
  model, variables = _setup(rank=4, alpha=8.0)
  variables = _with_singular_values(variables)
  x = jax.random.normal(jax.random.key(3), (3, 6))
  layer = variables["params"]["hidden"]
  q, p = variables["lora"]["hidden"]["Q"], variables["lora"]["hidden"]["P"]
  lam = variables["gates"]["hidden"]["singular_values"]
  delta = (q * lam) @ p * (8.0 / (4 + 1e-5))  # (P Λ Q)^T in the kernel layout
  hidden = jnp.tanh(x @ (layer["kernel"] + delta) + layer["bias"])
  out = variables["params"]["out"]
  q2, p2 = variables["lora"]["out"]["Q"], variables["lora"]["out"]["P"]
  lam2 = variables["gates"]["out"]["singular_values"]
  want = hidden @ (out["kernel"] + (q2 * lam2) @ p2 * (8.0 / (4 + 1e-5))) + out["bias"]
  np.testing.assert_allclose(model.apply(variables, x), want, rtol=1e-5, atol=1e-6)


# --- orthogonality penalty ---------------------------------------------------------------------


def test_orthogonality_penalty_paper_and_peft_forms():
  model, variables = _setup(rank=4)
  variables = {**variables, "lora": jax.tree.map(lambda f: f * 20.0, variables["lora"])}
  paper, peft_terms = 0.0, []
  for name in ("hidden", "out"):
    a = np.asarray(variables["lora"][name]["Q"]).T  # PEFT lora_A (r, in) = Q
    b = np.asarray(variables["lora"][name]["P"]).T  # PEFT lora_B (out, r) = P
    eye = np.eye(4)
    # paper eq. 4: ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2, summed over layers
    paper += np.sum((b.T @ b - eye) ** 2) + np.sum((a @ a.T - eye) ** 2)
    # PEFT: torch.norm(A A^T - I) and torch.norm(B^T B - I), averaged over matrices
    peft_terms += [np.linalg.norm(a @ a.T - eye), np.linalg.norm(b.T @ b - eye)]
  got_paper = jax.jit(lambda v: jaxrank.orthogonality_penalty(model, v))(variables)
  got_peft = jax.jit(lambda v: jaxrank.orthogonality_penalty(model, v, form="peft"))(variables)
  np.testing.assert_allclose(got_paper, paper, rtol=1e-5)
  np.testing.assert_allclose(got_peft, np.mean(peft_terms), rtol=1e-5)
  # orthonormal factors give zero penalty
  ortho = jax.tree.map(lambda f: f, variables)
  ortho["lora"]["hidden"]["Q"] = jnp.eye(6, 4)
  ortho["lora"]["hidden"]["P"] = jnp.eye(4, 12)
  ortho["lora"]["out"]["Q"] = jnp.eye(12, 4)
  ortho["lora"]["out"]["P"] = jnp.eye(4, 5)
  assert float(jaxrank.orthogonality_penalty(model, ortho)) == 0.0


# --- budget schedule ---------------------------------------------------------------------------


def _peft_formula(step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
  """PEFT RankAllocator.budget_schedule, transcribed (used when peft is not installed)."""
  if step <= tinit:
    return init_bgt, False
  if step > total_step - tfinal:
    return target_bgt, True
  mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
  return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % deltaT == 0


def _peft_schedule():
  try:
    from peft.tuners.adalora.layer import RankAllocator
  except ImportError:
    return _peft_formula

  def schedule(step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
    fake = types.SimpleNamespace(
        init_bgt=init_bgt, target_bgt=target_bgt,
        peft_config=types.SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total_step,
                                          deltaT=deltaT))
    return RankAllocator.budget_schedule(fake, step)
  return schedule


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    n=st.integers(1, 6), init_r=st.integers(1, 16), data=st.data(),
    total_step=st.integers(2, 300), deltaT=st.integers(1, 20))
def test_budget_schedule_equals_peft_at_every_step(n, init_r, data, total_step, deltaT):
  target_r = data.draw(st.integers(0, init_r))
  tfinal = data.draw(st.integers(0, total_step - 1))
  tinit = data.draw(st.integers(0, total_step - tfinal - 1))
  peft_schedule = _peft_schedule()
  for step in range(total_step + 2):
    args = (n * init_r, n * target_r, tinit, tfinal, total_step, deltaT)
    ours = budget_schedule(step, init_budget=args[0], target_budget=args[1], tinit=tinit,
                           tfinal=tfinal, total_step=total_step, deltaT=deltaT)
    assert ours == tuple(peft_schedule(step, *args)), step


def test_traced_budget_in_state_every_step_without_recompiling():
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  config = dict(init_r=4, target_r=1, tinit=3, tfinal=5, total_step=25, deltaT=2)
  tx = adalora(optax.adam(1e-2), **config)
  state = tx.init(trainable)
  loss = _loss_fn(model, frozen)

  @jax.jit
  def step_fn(trainable, state, x, y):
    updates, state = tx.update(jax.grad(loss)(trainable, x, y), state, trainable)
    return optax.apply_updates(trainable, updates), state

  final = config["total_step"] - config["tfinal"]
  previous = None
  for step in range(config["total_step"] + 3):
    trainable, state = step_fn(trainable, state, *_data(8, seed=step))
    want, mask_ind = budget_schedule(
        step, init_budget=8, target_budget=2, **{k: v for k, v in config.items()
                                               if k not in ("init_r", "target_r")})
    assert int(state.budget) == want, step
    pattern = rank_pattern_from_state(state)
    kept = sum(int(m.sum()) for m in pattern.values())
    lam = trainable["gates"]
    event = (mask_ind and step < final) or step == final
    if event:
      assert kept <= want  # ties at the threshold may drop more
    elif previous is not None:  # no mask event: the pattern is unchanged
      for k in pattern:
        np.testing.assert_array_equal(pattern[k], previous[k])
    if event or step > final:  # dropped singular values are exactly zero right then
      for k in pattern:
        assert np.all(np.asarray(lam[k]["singular_values"])[~np.asarray(pattern[k])] == 0.0)
    previous = pattern
  assert kept == 2
  assert step_fn._cache_size() == 1


@pytest.mark.parametrize("compat", ["peft", "paper"])
def test_pruned_singular_values_regrow_between_events(compat):
  """Only Λ is zeroed; P, Q and the optimizer state are kept, so a triplet can come back.

  ``compat="peft"``: Λ regrows between events; ``"paper"``: Λ is masked after every update
  (eq. 6), the P/Q of the masked triplets still move.
  """
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  tx = adalora(optax.adam(1e-2), init_r=4, target_r=1, tinit=1, tfinal=2, total_step=40,
               deltaT=10, compat=compat)
  state = tx.init(trainable)
  loss = jax.jit(jax.grad(_loss_fn(model, frozen)))
  update = jax.jit(tx.update)
  for step in range(11):
    updates, state = update(loss(trainable, *_data(8, step)), state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  pattern = rank_pattern_from_state(state)  # first mask event at step 10
  dropped = {k: ~np.asarray(v) for k, v in pattern.items()}
  assert sum(int(d.sum()) for d in dropped.values()) > 0
  for k, d in dropped.items():
    assert np.all(np.asarray(trainable["gates"][k]["singular_values"])[d] == 0.0)
  updates, state = update(loss(trainable, *_data(8, 11)), state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  regrown = [np.asarray(trainable["gates"][k]["singular_values"])[d] for k, d in dropped.items()]
  if compat == "peft":
    assert np.all(np.concatenate(regrown) != 0.0)
  else:
    np.testing.assert_array_equal(np.concatenate(regrown), 0.0)
    for k, d in dropped.items():  # the masked triplets' P keep their values (not re-zeroed)
      assert np.any(np.asarray(trainable["lora"][k]["P"])[d] != 0.0)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_r=4, target_r=5, total_step=10), "target_r=5 > init_r=4"),
    (dict(init_r=4, target_r=2, tinit=6, tfinal=4, total_step=10), "no budgeting phase"),
    (dict(init_r=4, target_r=2, total_step=10, beta1=1.0), "beta1 must be in"),
    (dict(init_r=4, target_r=2, total_step=10, beta2=0.0), "beta2 must be in"),
    (dict(init_r=4, target_r=2), "total_step is required"),
    (dict(init_r=4, target_r=2, total_step=10, deltaT=0), "deltaT must be"),
])
def test_construction_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    adalora(optax.sgd(0.1), **kwargs)


def test_errors_on_parameters():
  tx = adalora(optax.sgd(0.1), init_r=4, target_r=2, total_step=10)
  plain = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=4)).init(jax.random.key(0), jnp.ones((1, 6)))
  with pytest.raises(ValueError, match="found no AdaLoRA adapters"):
    tx.init(jaxrank.split_variables(plain)[1])
  _, variables = _setup(rank=3)
  with pytest.raises(ValueError, match="init_r=4"):
    tx.init(variables)
  _, variables = _setup(rank=4)
  state = tx.init(variables)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(variables, state)


# --- composition: full variables, chains, MultiSteps, inject_hyperparams, axis_name -----------


def test_full_variables_and_state_inside_a_chain():
  model, variables = _setup(rank=4)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   adalora(optax.sgd(0.1), init_r=4, target_r=2, tinit=0, tfinal=1, total_step=4))
  state = tx.init(variables)
  grads = jax.tree.map(jnp.ones_like, variables)
  updates, state = jax.jit(tx.update)(grads, state, variables)
  clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
  # leaves other than Λ get the inner update unchanged (params too)
  np.testing.assert_allclose(updates["params"]["out"]["kernel"],
                             -0.1 * clipped["params"]["out"]["kernel"])
  np.testing.assert_allclose(updates["lora"]["hidden"]["Q"], -0.1 * clipped["lora"]["hidden"]["Q"])
  assert set(rank_pattern_from_state(state)) == {"hidden", "out"}
  assert int(find_state(state).count) == 1


def test_inject_hyperparams_gives_the_same_result():
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  schedule = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8, deltaT=1)
  direct = adalora(optax.adam(1e-2), beta1=0.8, beta2=0.9, **schedule)
  injected = optax.inject_hyperparams(adalora, static_args=tuple(schedule))(
      optax.adam(1e-2), beta1=0.8, beta2=0.9, **schedule)
  grad = jax.jit(jax.grad(_loss_fn(model, frozen)))
  results = []
  for tx in (direct, injected):
    t, state = trainable, tx.init(trainable)
    for step in range(8):
      updates, state = jax.jit(tx.update)(grad(t, *_data(8, step)), state, t)
      t = optax.apply_updates(t, updates)
    results.append((t, rank_pattern_from_state(state)))
  jax.tree.map(np.testing.assert_array_equal, results[0][1], results[1][1])  # the same pattern
  # the same values up to float32 rounding (XLA may fuse traced and constant betas differently)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               results[0][0], results[1][0])


def test_multisteps_accumulation_gives_the_same_masks_as_the_big_batch():
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  config = dict(init_r=4, target_r=1, tinit=2, tfinal=3, total_step=14, deltaT=1)
  big = adalora(optax.adam(1e-2), **config)
  accumulated = optax.MultiSteps(adalora(optax.adam(1e-2), **config), every_k_schedule=4)
  loss = _loss_fn(model, frozen)
  grad = jax.jit(jax.grad(loss))
  big_update, acc_update = jax.jit(big.update), jax.jit(accumulated.update)
  t_big, s_big = trainable, big.init(trainable)
  t_acc, s_acc = trainable, accumulated.init(trainable)
  for step in range(config["total_step"] + 1):
    x, y = _data(32, seed=step)
    updates, s_big = big_update(grad(t_big, x, y), s_big, t_big)
    t_big = optax.apply_updates(t_big, updates)
    for micro in range(4):
      sl = slice(8 * micro, 8 * micro + 8)
      updates, s_acc = acc_update(grad(t_acc, x[sl], y[sl]), s_acc, t_acc)
      t_acc = optax.apply_updates(t_acc, updates)
    big_pattern, acc_pattern = rank_pattern_from_state(s_big), rank_pattern_from_state(s_acc)
    for k in big_pattern:
      np.testing.assert_array_equal(acc_pattern[k], big_pattern[k], err_msg=f"step {step}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), t_acc, t_big)
  assert int(find_state(s_acc).count) == config["total_step"] + 1  # optimizer steps
  assert sum(int(m.sum()) for m in rank_pattern_from_state(s_acc).values()) == 2


def test_axis_name_averages_scores_across_replicas():
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  grad = jax.grad(_loss_fn(model, frozen))
  trainable = _with_singular_values(trainable)
  g = grad(trainable, *_data(4, seed=10))
  # the second replica sees the ranks in reverse order, so local rankings disagree
  reversed_ranks = {
      "lora": {k: {"Q": v["Q"][:, ::-1], "P": v["P"][::-1]} for k, v in g["lora"].items()},
      "gates": {k: {"singular_values": v["singular_values"][::-1]} for k, v in g["gates"].items()},
  }
  replica_grads = [g, reversed_ranks]
  stacked = jax.tree.map(lambda *g: jnp.stack(g), *replica_grads)
  config = dict(init_r=4, target_r=2, tinit=0, tfinal=0, total_step=4, deltaT=1)

  def masks_after_one_mask_event(tx):
    state = tx.init(trainable)._replace(count=jnp.asarray(2, jnp.int32))  # a mask step
    run = lambda g: rank_pattern_from_state(tx.update(g, state, trainable)[1])
    return jax.jit(jax.vmap(run, axis_name="replicas"))(stacked)

  synced = masks_after_one_mask_event(adalora(optax.sgd(0.1), axis_name="replicas", **config))
  local = masks_after_one_mask_event(adalora(optax.sgd(0.1), **config))
  for k in synced:
    np.testing.assert_array_equal(synced[k][0], synced[k][1])
  # without the pmean the replicas disagree for these gradients (so the test can fail)
  assert any(not np.array_equal(local[k][0], local[k][1]) for k in local)


# --- planted rank ------------------------------------------------------------------------------


def test_budget_concentrates_on_layers_with_planted_rank():
  path = pathlib.Path(__file__).parent.parent / "examples" / "adalora_toy.py"
  spec = importlib.util.spec_from_file_location("adalora_toy", path)
  toy = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(toy)
  pattern, mse = toy.main(seed=0, log_every=10**9)
  assert pattern == toy.PLANTED  # {'l1': 4, 'l2': 0, 'l3': 2}
  assert mse < 0.02






def test_layers_stacked_by_scan_are_ranked_as_separate_matrices():
  model = jaxrank.wrap(scan_models.Scanned(stack_name="blocks"), adapter=AdaLoRA(rank=4))
  variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
  frozen, trainable = jaxrank.split_variables(variables)
  tx = adalora(optax.adam(1e-2), init_r=4, target_r=1, tinit=1, tfinal=2, total_step=8)
  state = tx.init(trainable)

  def loss(t, x):
    return jnp.mean((model.apply({**frozen, **t}, x) - 1.0) ** 2)

  @jax.jit
  def step_fn(t, state, x):
    updates, state = tx.update(jax.grad(loss)(t, x), state, t)
    return optax.apply_updates(t, updates), state

  for step in range(9):
    trainable, state = step_fn(trainable, state, jnp.asarray(_data(8, step)[0]))
  (mask,) = rank_pattern_from_state(state).values()
  assert mask.shape == (3, 4)
  assert int(state.budget) == 3 and int(mask.sum()) == 3  # target_r x 3 stacked matrices
  lam = trainable["gates"]["blocks"]["mix"]["singular_values"]
  assert np.all(np.asarray(lam)[~np.asarray(mask)] == 0.0)
  np.testing.assert_array_equal(jaxrank.rank_masks(model, {**frozen, **trainable})["blocks/mix"],
                                mask)


# --- issue 16: past total_step, export between events ---------------------------------------


def _run_steps(tx, model, trainable, frozen, steps):
  state = tx.init(trainable)
  loss = jax.jit(jax.grad(_loss_fn(model, frozen)))
  update = jax.jit(tx.update)
  patterns = []
  for step in range(steps):
    updates, state = update(loss(trainable, *_data(8, step)), state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    patterns.append({k: int(np.sum(v)) for k, v in rank_pattern_from_state(state).items()})
  return trainable, state, patterns


def test_final_pattern_is_kept_after_total_step_with_tfinal_zero():
  """With tfinal=0 the last allocation is at step total_step; later steps keep it (PEFT)."""
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  tx = adalora(optax.adam(1e-2), init_r=4, target_r=2, tinit=2, total_step=10)
  trainable, state, patterns = _run_steps(tx, model, trainable, frozen, 16)
  final = patterns[10]  # the call with count == total_step
  assert sum(final.values()) == 4
  for later in patterns[11:]:
    assert later == final
  assert jaxrank.rank_pattern(model, {**frozen, **trainable}) == final


def test_exported_ranks_follow_the_allocator_between_mask_events():
  """A run that ends between mask events exports the allocator's pattern, not Λ≠0."""
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  tx = adalora(optax.adam(1e-2), init_r=4, target_r=1, tinit=1, tfinal=2, total_step=40,
               deltaT=10)
  trainable, state, patterns = _run_steps(tx, model, trainable, frozen, 13)  # event at 10
  allocator = patterns[-1]
  assert sum(allocator.values()) < 8
  full = {**frozen, **trainable}
  assert jaxrank.rank_pattern(model, full) == allocator
  _, _, compacted = jaxrank.compact(model, full)
  assert compacted == allocator
  for k, kept in rank_pattern_from_state(state).items():
    lam = np.asarray(trainable["gates"][k]["singular_values"])
    np.testing.assert_array_equal(lam[~np.asarray(kept)], 0.0)


# --- issue 16: the orthogonality term inside the transform ------------------------------------


def _mse_loss(model, frozen, scale=1.0):
  def loss(trainable, x, y):
    return scale * jnp.mean((model.apply({**frozen, **trainable}, x) - y) ** 2)
  return loss


def _train(tx, model, frozen, trainable, loss, steps=15):
  state = tx.init(trainable)
  grad = jax.jit(jax.grad(loss))
  update = jax.jit(tx.update)
  for step in range(steps):
    updates, state = update(grad(trainable, *_data(8, step)), state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  return trainable


@pytest.mark.parametrize("form", ["paper", "peft"])
def test_literal_orthogonality_equals_the_penalty_in_the_loss(form):
  """orth_normalize=False: ∇C + γ∇R, i.e. the paper's objective C + γ R (eq. 4)."""
  model, variables = _setup(rank=4)
  variables = _with_singular_values(variables)
  frozen, trainable = jaxrank.split_variables(variables)
  kw = dict(init_r=4, target_r=2, tinit=2, tfinal=2, total_step=15, deltaT=2)
  mse = _mse_loss(model, frozen)
  in_loss = lambda t, x, y: mse(t, x, y) + 0.3 * jaxrank.orthogonality_penalty(
      model, {**frozen, **t}, form=form)
  want = _train(adalora(optax.sgd(0.05), **kw), model, frozen, trainable, in_loss)
  got = _train(adalora(optax.sgd(0.05), orth_weight=0.3, orth_form=form, orth_normalize=False,
                       **kw), model, frozen, trainable, mse)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_normalised_orthogonality_does_not_depend_on_the_loss_scale():
  """∇C + γ ρ̄ ∇R: scaling C by 64 scales the whole gradient, which Adam removes; the literal
  form changes with the scale (so the test can fail)."""
  model, variables = _setup(rank=4)
  frozen, trainable = jaxrank.split_variables(variables)
  kw = dict(init_r=4, target_r=2, tinit=3, tfinal=3, total_step=15, deltaT=2, orth_weight=1.0)
  runs = {}
  for normalize in (True, False):
    for scale in (1.0, 64.0):
      tx = adalora(optax.adam(1e-2, eps=1e-12), orth_normalize=normalize, **kw)
      runs[normalize, scale] = _train(tx, model, frozen, trainable,
                                      _mse_loss(model, frozen, scale))
  for a, b in zip(jax.tree.leaves(runs[True, 1.0]), jax.tree.leaves(runs[True, 64.0])):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
  assert not all(np.allclose(a, b, rtol=2e-3, atol=1e-5) for a, b in zip(
      jax.tree.leaves(runs[False, 1.0]), jax.tree.leaves(runs[False, 64.0])))


@pytest.mark.parametrize("kwargs, message", [
    (dict(compat="hf"), "compat must be"),
    (dict(importance="grad"), "importance must be"),
    (dict(orth_form="sum"), "orth_form must be"),
])
def test_option_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    adalora(optax.sgd(0.1), init_r=4, target_r=2, total_step=10, **kwargs)


def test_unit_norm_init_of_the_singular_vectors():
  spec = AdaLoRA(rank=64, init_std=None)
  down = spec.init_down(jax.random.key(0), (256,))
  up = spec.init_up(jax.random.key(1), (128,))
  np.testing.assert_allclose(np.mean(np.sum(np.square(down), axis=0)), 1.0, rtol=0.05)
  np.testing.assert_allclose(np.mean(np.sum(np.square(up), axis=1)), 1.0, rtol=0.05)
