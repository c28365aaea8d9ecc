"""Foundation: wrap, layer kinds, module styles, transforms, merge, helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrank
import scan_models


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="hidden")(x))
    return nn.Dense(3, name="out")(x)


class SetupMLP(nn.Module):
  def setup(self):
    self.hidden = nn.Dense(16)
    self.out = nn.Dense(3)

  def __call__(self, x):
    return self.out(nn.relu(self.hidden(x)))


class Attention(nn.Module):
  """DenseGeneral projections with several feature axes, as in attention."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((2, 4), name="query")(x)  # (b, t, heads, head_dim)
    k = nn.DenseGeneral((2, 4), name="key")(x)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, q)
    return nn.DenseGeneral(6, axis=(-2, -1), name="out")(o)  # contracts (heads, head_dim)


class EinsumNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.Einsum((6, 2, 4), "bti,ihd->bthd", name="proj")(x)
    return y.reshape(y.shape[:2] + (-1,))






class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.remat(nn.Dense)(8, name=f"dense_{i}")(x)
    return x


def randomize_lora(variables, key, scale=0.3):
  """Non-zero up factors, so adapters change the output."""
  leaves, tree = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(key, len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return {**variables, "lora": jax.tree.unflatten(tree, new)}


CASES = {
    "dense_compact": (MLP, (4, 5)),
    "dense_setup": (SetupMLP, (4, 5)),
    "dense_general": (Attention, (2, 3, 6)),
    "einsum": (EinsumNet, (2, 3, 6)),
    "scan": (scan_models.Scanned, (4, 8)),
    "remat": (Remat, (4, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_at_init_and_merge(case):
  module_cls, shape = CASES[case]
  base = module_cls()
  x = jax.random.normal(jax.random.key(1), shape)
  model = jaxrank.wrap(base, targets="all-linear", adapter=jaxrank.LoRA(rank=2, alpha=4))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert set(variables) == {"params", "lora"}
  base_out = jax.jit(base.apply)({"params": variables["params"]}, x)
  out = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(out, base_out, rtol=1e-6, atol=1e-6)

  variables = randomize_lora(variables, jax.random.key(2))
  adapted = jax.jit(model.apply)(variables, x)
  assert not np.allclose(adapted, base_out, atol=1e-3), "adapters must change the output"
  merged = jax.jit(lambda v: jaxrank.merge(model, v))(variables)
  merged_out = jax.jit(base.apply)({"params": merged}, x)
  rel = np.linalg.norm(merged_out - adapted) / np.linalg.norm(adapted)
  assert rel <= 1e-5, rel
  # merge outside jit too (it jits itself)
  merged_eager = jaxrank.merge(model, variables)
  jax.tree.map(np.testing.assert_array_equal, merged_eager, merged)


def test_adapter_paths_mirror_base_paths():
  model = jaxrank.wrap(Attention(), targets=["query", "out"], adapter=jaxrank.LoRA(rank=3))
  variables = model.init(jax.random.key(0), jnp.ones((2, 3, 6)))
  lora = variables["lora"]
  assert sorted(lora) == ["out", "query"]
  assert lora["query"]["A"].shape == (6, 3) and lora["query"]["B"].shape == (3, 2, 4)
  assert lora["out"]["A"].shape == (2, 4, 3) and lora["out"]["B"].shape == (3, 6)


def test_scan_stacks_adapters_and_counts_ranks():
  model = jaxrank.wrap(scan_models.Scanned(), adapter=jaxrank.LoRA(rank=2))
  variables = model.init(jax.random.key(0), jnp.ones((4, 8)))
  assert variables["lora"]["layers"]["mix"]["A"].shape == (3, 8, 2)
  assert jaxrank.rank_pattern(model, variables) == {"layers/mix": [2, 2, 2]}
  assert jaxrank.effective_parameter_count(model, variables) == 3 * 2 * (8 + 8)


def test_scan_without_adapter_collections_names_the_fix():
  model = jaxrank.wrap(scan_models.Scanned(variable_axes=("params",)),
                       adapter=jaxrank.LoRA(rank=2))
  with pytest.raises(ValueError, match="variable_axes"):
    model.init(jax.random.key(0), jnp.ones((4, 8)))


def test_gradients_reach_only_lora_and_gates():
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2))
  x = jnp.ones((4, 5))
  variables = randomize_lora(model.init(jax.random.key(0), x), jax.random.key(1))

  @jax.jit
  def grads(variables):
    return jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(variables)

  g = grads(variables)
  frozen, trainable = jaxrank.split_variables(g)
  assert all(float(jnp.abs(l).sum()) > 0 for l in jax.tree.leaves(trainable))

  # The usual training step differentiates only the trainable part.
  frozen, trainable = jaxrank.split_variables(variables)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state):
    loss, g = jax.value_and_grad(
        lambda t: jnp.mean(model.apply(jaxrank.join_variables(frozen, t), x) ** 2)
    )(trainable)
    updates, state = tx.update(g, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  new_trainable, state, _ = step(trainable, state)
  assert not np.allclose(new_trainable["lora"]["hidden"]["A"], trainable["lora"]["hidden"]["A"])

  # optax.partition over full variables leaves the base untouched.
  tx = optax.partition(
      {"params": optax.set_to_zero(), "lora": optax.adam(1e-2)}, jaxrank.collection_labels
  )
  state = tx.init(variables)
  full_grads = grads(variables)
  updates, _ = jax.jit(tx.update)(full_grads, state, variables)
  new = optax.apply_updates(variables, updates)
  jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
  assert not np.allclose(new["lora"]["out"]["B"], variables["lora"]["out"]["B"])


def test_jitted_apply_always_includes_adapters():
  """The interceptor is entered inside apply, so no cached trace can skip it."""
  base = MLP()
  model = jaxrank.wrap(base, adapter=jaxrank.LoRA(rank=2))
  x = jnp.ones((2, 5))
  variables = randomize_lora(model.init(jax.random.key(0), x), jax.random.key(1))
  base_apply = jax.jit(base.apply)
  plain = base_apply({"params": variables["params"]}, x)
  adapted_apply = jax.jit(model.apply)
  for _ in range(2):
    out = adapted_apply(variables, x)
    assert not np.allclose(out, plain, atol=1e-4)
    np.testing.assert_allclose(base_apply({"params": variables["params"]}, x), plain)


def test_apply_without_lora_collection_is_a_clear_error():
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2))
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  with pytest.raises(ValueError, match="all collections returned by the wrapped model's init"):
    model.apply({"params": variables["params"]}, jnp.ones((1, 5)))


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("all-linear", ["hidden", "out"]),
        (["hidden"], ["hidden"]),
        ("hid.*", ["hidden"]),
        (["out", "hidden"], ["hidden", "out"]),
    ],
)
def test_target_patterns(targets, expected):
  model = jaxrank.wrap(MLP(), targets=targets, adapter=jaxrank.LoRA(rank=2))
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  assert sorted(variables["lora"]) == expected


@pytest.mark.parametrize("targets", [["query"], "dense_.*", ["hidden", "nothere"]])
def test_pattern_matching_nothing_lists_existing_layers(targets):
  model = jaxrank.wrap(MLP(), targets=targets)
  with pytest.raises(ValueError, match=r"matched no linear layer(.|\n)*hidden\n  out"):
    model.init(jax.random.key(0), jnp.ones((1, 5)))


def test_bad_arguments():
  with pytest.raises(TypeError, match="flax.linen.Module"):
    jaxrank.wrap(lambda x: x)
  with pytest.raises(ValueError, match="regular expression"):
    jaxrank.wrap(MLP(), targets="(")
  with pytest.raises(ValueError, match="rank"):
    jaxrank.LoRA(rank=0)
  with pytest.raises(ValueError, match="non-empty list"):
    jaxrank.wrap(MLP(), targets=[])


def test_bfloat16_base_model_float32_adapters():
  class Bf16(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="d")(x)

  model = jaxrank.wrap(Bf16(), adapter=jaxrank.LoRA(rank=2))
  x = jnp.ones((2, 4), jnp.bfloat16)
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["d"]["kernel"].dtype == jnp.bfloat16
  assert variables["lora"]["d"]["A"].dtype == jnp.float32
  variables = randomize_lora(variables, jax.random.key(1))
  out = jax.jit(model.apply)(variables, x)
  assert out.dtype == jnp.bfloat16
  g = jax.jit(jax.grad(lambda l: jnp.sum(model.apply({**variables, "lora": l}, x).astype(jnp.float32))))(
      variables["lora"]
  )
  assert g["d"]["A"].dtype == jnp.float32
  merged = jaxrank.merge(model, variables)
  assert merged["d"]["kernel"].dtype == jnp.bfloat16


def test_dropout_only_with_a_dropout_rng():
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=4, dropout=0.5))
  x = jnp.ones((8, 5))
  variables = randomize_lora(model.init(jax.random.key(0), x), jax.random.key(1))
  apply = jax.jit(model.apply)
  eval_a, eval_b = apply(variables, x), apply(variables, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = jax.jit(lambda v, k: model.apply(v, x, rngs={"dropout": k}))
  t1, t2 = train(variables, jax.random.key(3)), train(variables, jax.random.key(4))
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, eval_a)


def test_compact_plain_lora_keeps_function():
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=3, alpha=6))
  x = jax.random.normal(jax.random.key(5), (4, 5))
  variables = randomize_lora(model.init(jax.random.key(0), x), jax.random.key(1))
  lora_model, compacted, pattern = jaxrank.compact(model, variables)
  assert pattern == {"hidden": 3, "out": 3}
  np.testing.assert_allclose(
      lora_model.apply(compacted, x), model.apply(variables, x), rtol=1e-5, atol=1e-6
  )


def test_counts_and_labels():
  model = jaxrank.wrap(MLP(), targets=["hidden"], adapter=jaxrank.LoRA(rank=2))
  variables = model.init(jax.random.key(0), jnp.ones((1, 5)))
  counts = jaxrank.count_parameters(variables)
  assert counts == {"params": 5 * 16 + 16 + 16 * 3 + 3, "lora": 2 * (5 + 16)}
  assert jaxrank.trainable_parameter_count(variables) == 2 * (5 + 16)
  labels = jaxrank.collection_labels(variables)
  assert labels["lora"]["hidden"]["A"] == "lora"
  assert labels["params"]["out"]["kernel"] == "params"
