"""merge keeps the input shardings, on 8 simulated CPU devices."""

from multidevice import run_on_devices


def test_merge_keeps_shardings_on_a_mesh():
  out = run_on_devices("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jaxrank
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2))
    x = jnp.ones((4, 8))
    v = model.init(jax.random.key(0), x)
    v["lora"] = jax.tree.map(lambda a: a + 0.1, v["lora"])
    specs = {"hidden": {"kernel": P(None, "model"), "bias": P("model")},
             "out": {"kernel": P("model", None), "bias": P()}}
    v["params"] = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                               v["params"], specs)
    merged = jaxrank.merge(model, v)
    for name in ("hidden", "out"):
      for leaf in ("kernel", "bias"):
        assert merged[name][leaf].sharding == v["params"][name][leaf].sharding, name
    ref = MLP().apply({"params": merged}, x)
    np.testing.assert_allclose(ref, model.apply(v, x), rtol=1e-5, atol=1e-6)
    print("ok", merged["hidden"]["kernel"].sharding.spec)
  """)
  assert "ok" in out
