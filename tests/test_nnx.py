"""jaxrank.nnx: NNX adaptation in place, Linen/NNX parity of every method, 8 devices, export."""

import contextlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxrank
import method_configs
import toy_training
from multidevice import run_on_devices

STEPS = 100
TRAINABLE = jaxrank.nnx.TRAINABLE


class NnxMLP(nnx.Module):
  """toy_training.MLP written with nnx.Linear (same attribute names as the Linen layer names)."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(toy_training.FEATURES, 8, rngs=rngs)
    self.out = nnx.Linear(8, toy_training.OUTPUTS, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def _nnx_alora_tx(adapter, graphdef, like, steps, axis_name=None):
  """method_configs.alora's transform, with a loss_fn that runs the NNX model (split/merge)."""
  from jaxrank import alora as alora_transform

  def loss_fn(trainable_view, batch):
    frozen, x, y = batch
    model = nnx.merge(graphdef, jaxrank.nnx.from_linen_view(trainable_view, like), frozen)
    return jnp.mean((model(x) - y) ** 2)

  rounds = 3
  recovery = max(1, steps // (rounds + 2))
  return alora_transform(optax.adam(1e-2), adapter, loss_fn, warmup_steps=recovery,
                         recovery_steps=recovery, num_rounds=rounds, ranks_per_round=1,
                         total_steps=steps, chunk_size=4, axis_name=axis_name)


def _alora_validation():
  x_val = jax.random.normal(jax.random.key(7), (32, 6))
  return x_val, jnp.sin(x_val[:, :4] * 2.0)


def train_linen(method, steps=STEPS):
  config = method_configs.CONFIGS[method](steps)
  model, frozen, state, (x_all, y_all) = toy_training.setup(config, steps)
  initial = jaxrank.join_variables(frozen, state["trainable"])
  step = jax.jit(toy_training.make_step(config, model))
  for i in range(steps):
    state = step(state, frozen, x_all[i], y_all[i])
  return model, initial, jaxrank.join_variables(frozen, state["trainable"])


def make_nnx(config, variables):
  """The NNX MLP, adapted, with the Linen model's initial variables copied in."""
  model = jaxrank.nnx.wrap(NnxMLP(nnx.Rngs(0)), adapter=config.adapter, rngs=nnx.Rngs(1))
  if "lagrange_multiplier" in variables.get("gates", {}):
    jaxrank.nnx.add_lagrange_multiplier(model)
  return jaxrank.nnx.from_linen_variables(model, variables)


def train_nnx(method, initial, steps=STEPS, mesh=None):
  config = method_configs.CONFIGS[method](steps)
  model = make_nnx(config, initial)
  adapter = config.adapter
  x_all, y_all = toy_training.data(steps)
  extra = {}
  tx = config.optimizer
  if method == "alora":
    graphdef, like, frozen = nnx.split(model, TRAINABLE, ...)
    tx = _nnx_alora_tx(adapter, graphdef, like, steps)
    extra = {"validation_batch": (frozen, *_alora_validation())}
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    nnx.update(model, jax.device_put(nnx.state(model), replicated))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    x_all, y_all = jax.device_put(x_all, batch), jax.device_put(y_all, batch)
  optimizer = nnx.Optimizer(model, jaxrank.nnx.transform(tx), wrt=TRAINABLE)

  @nnx.jit
  def step(model, optimizer, x, y, sample_rng, extra):
    def loss_fn(model):
      with jaxrank.nnx.rngs(dropout=sample_rng, hard_concrete=sample_rng):
        out = model(x)
      return jnp.mean((out - y) ** 2) + config.penalty(adapter,
                                                       jaxrank.nnx.to_linen_variables(model))

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
    optimizer.update(model, grads, **extra)

  rng = jax.random.key(42)  # toy_training.setup's stream
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for i in range(steps):
      rng, sample_rng = jax.random.split(rng)
      step(model, optimizer, x_all[i], y_all[i], sample_rng, extra)
  return model, optimizer


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


X_TEST = jax.random.normal(jax.random.key(3), (8, toy_training.FEATURES))


@pytest.mark.parametrize("method", ["lora", "sora", "adalora", "salora", "alora"])
def test_linen_nnx_parity(method):
  linen_model, initial, final = train_linen(method)
  model, _ = train_nnx(method, initial)
  view = jaxrank.nnx.to_linen_variables(model)
  assert jaxrank.nnx.rank_pattern(model) == jaxrank.rank_pattern(linen_model, final)
  diff = float(jnp.max(jnp.abs(linen_model.apply(final, X_TEST) - model(X_TEST))))
  print(f"{method}: max output diff {diff:.3g}, ranks {jaxrank.nnx.rank_pattern(model)}")
  assert diff < 1e-5
  assert _max_diff(view["gates"], final["gates"]) < 1e-4 if "gates" in final else True
  # the base stayed frozen
  assert _max_diff(view["params"], initial["params"]) == 0.0


def test_state_paths_and_filters():
  model = jaxrank.nnx.wrap(NnxMLP(nnx.Rngs(0)), ["hidden"], jaxrank.SoRA(rank=3),
                           rngs=nnx.Rngs(1))
  paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE)))
  assert paths == ["hidden/gates/g", "hidden/lora/A", "hidden/lora/B"]
  assert sorted("/".join(map(str, p)) for p, _ in
                nnx.to_flat_state(nnx.state(model, jaxrank.nnx.BASE))) == [
                    "hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
  assert not nnx.state(model, nnx.LoRAParam)["hidden"].get("gates")
  view = jaxrank.nnx.to_linen_variables(model)
  assert sorted(view) == ["gates", "lora", "params"]
  assert sorted(view["lora"]["hidden"]) == ["A", "B"]
  with pytest.raises(ValueError, match="hidden"):
    jaxrank.nnx.wrap(NnxMLP(nnx.Rngs(0)), ["nope"], jaxrank.LoRA(), rngs=nnx.Rngs(1))
  # all-linear leaves the head out
  class Head(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.Linear(3, 3, rngs=rngs)
      self.lm_head = nnx.Linear(3, 2, rngs=rngs)
  assert list(jaxrank.nnx.adapted_layers(
      jaxrank.nnx.wrap(Head(nnx.Rngs(0)), rngs=nnx.Rngs(1)))) == ["body"]


def _linen_with_random_b(module, x, adapter):
  linen = jaxrank.wrap(module, adapter=adapter)
  variables = linen.init(jax.random.key(0), x)
  b = jax.random.normal(jax.random.key(5), variables["lora"]["B"].shape)
  return linen, {**variables, "lora": {**variables["lora"], "B": b}}


@pytest.mark.parametrize("kind", ["general", "einsum"])
def test_linear_general_and_einsum_match_linen(kind):
  x = jax.random.normal(jax.random.key(1), (2, 3, 4))
  adapter = jaxrank.SoRA(rank=2)
  if kind == "general":
    linen, variables = _linen_with_random_b(nn.DenseGeneral((5, 2), axis=(-2, -1)), x, adapter)
    layer = nnx.LinearGeneral((3, 4), (5, 2), axis=(-2, -1), rngs=nnx.Rngs(0))
  else:
    linen, variables = _linen_with_random_b(nn.Einsum((4, 5), "bti,io->bto"), x, adapter)
    layer = nnx.Einsum("bti,io->bto", (4, 5), (5,), rngs=nnx.Rngs(0))
  layer = jaxrank.nnx.from_linen_variables(
      jaxrank.nnx.wrap(layer, adapter=adapter, rngs=nnx.Rngs(1)), variables)
  np.testing.assert_allclose(layer(x), linen.apply(variables, x), atol=1e-5)


def test_sharding_metadata_carries_over():
  mesh = jax.make_mesh((1,), ("model",))
  with jax.set_mesh(mesh):
    layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": (None, "model")})
    jaxrank.nnx.wrap(layer, adapter=jaxrank.LoRA(rank=2), rngs=nnx.Rngs(1))
  assert layer.lora.A.get_metadata()["out_sharding"] == (None, None)
  assert layer.lora.B.get_metadata()["out_sharding"] == (None, "model")


def test_compact_merge_and_checkpoint(tmp_path):
  linen_model, initial, final = train_linen("adalora")  # ranks 4 -> 2: compact drops some
  model, optimizer = train_nnx("adalora", initial)
  expected = model(X_TEST)
  # compact: a plain-LoRA copy with dead ranks dropped, same outputs, same pattern as Linen
  compacted, pattern = jaxrank.nnx.compact(model)
  assert pattern == jaxrank.compact(linen_model, final)[2] == jaxrank.nnx.rank_pattern(model)
  np.testing.assert_allclose(compacted(X_TEST), expected, atol=1e-5)
  assert compacted.hidden.lora.A.shape[-1] == pattern["hidden"] < 4
  # merge: base params with the adapters folded in, loaded into a plain NNX model
  plain = NnxMLP(nnx.Rngs(0))
  nnx.update(plain, jaxrank.nnx.merge(model))
  np.testing.assert_allclose(plain(X_TEST), expected, atol=1e-5)
  # orbax round trip of the trainable NNX state (as its Linen view) and the optimizer state
  state = {"trainable": jaxrank.nnx.to_linen_view(nnx.state(model, TRAINABLE)),
           "opt_state": nnx.to_pure_dict(nnx.state(optimizer.opt_state))}
  jaxrank.checkpoint.save(str(tmp_path), 100, state)
  restored = jaxrank.checkpoint.restore(str(tmp_path), state)
  fresh = make_nnx(method_configs.CONFIGS["adalora"](STEPS), initial)
  jaxrank.nnx.from_linen_variables(fresh, restored["trainable"])
  np.testing.assert_allclose(fresh(X_TEST), expected, atol=0)
  assert _max_diff(restored["opt_state"], state["opt_state"]) == 0.0
  # PEFT export reuses the Linen code path through the view
  config = jaxrank.save_peft_adapter(str(tmp_path / "peft"), jaxrank.nnx.adapter_of(model),
                                     jaxrank.nnx.to_linen_variables(model))
  assert config["r"] >= 1


MULTI = """
import json, sys
sys.path.insert(0, {tests!r})
import jax, jaxrank, test_nnx
from flax import nnx
mesh = jax.make_mesh((8,), ("data",))
report = {{}}
for method in {methods!r}:
  _, initial, _ = test_nnx.train_linen(method, 24)
  one, _ = test_nnx.train_nnx(method, initial, 24)
  eight, _ = test_nnx.train_nnx(method, initial, 24, mesh=mesh)
  report[method] = {{
      "same_pattern": jaxrank.nnx.rank_pattern(one) == jaxrank.nnx.rank_pattern(eight),
      "pattern": jaxrank.nnx.rank_pattern(eight),
      "devices": len(jax.tree.leaves(nnx.state(eight, nnx.LoRAParam))[0].sharding.device_set),
      "max_diff": float(abs(one(test_nnx.X_TEST) - eight(test_nnx.X_TEST)).max())}}
print(json.dumps(report))
"""


def test_nnx_eight_devices_same_ranks():
  methods = ["sora", "adalora", "salora", "alora"]
  code = MULTI.format(tests=os.path.dirname(__file__), methods=methods)
  report = json.loads(run_on_devices(code).strip().splitlines()[-1])
  print(report)
  for method in methods:
    assert report[method]["same_pattern"], report
    assert report[method]["devices"] == 8, report
    assert report[method]["max_diff"] < 1e-4, report
