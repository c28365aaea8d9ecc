"""Checkpoints: bit-exact resume in a new process, interrupted saves, other shardings."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrank
import method_configs

SCRIPT = os.path.join(os.path.dirname(__file__), "resume_script.py")


def _run(*args, expect=0):
  result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == expect, result.stderr[-3000:]


@pytest.mark.parametrize("method", sorted(method_configs.CONFIGS))
def test_resume_is_bit_exact(tmp_path, method):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _run(straight, 12, "--method", method)
  _run(resumed, 12, "--method", method, "--die-after", 5, expect=17)
  assert jaxrank.checkpoint.latest_step(resumed) == 5
  _run(resumed, 12, "--method", method)
  a, b = np.load(straight / "final.npz"), np.load(resumed / "final.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
  """A process killed while writing step 2 leaves step 1 loadable."""
  code = f"""
import os, jax, jax.numpy as jnp, jaxrank
import orbax.checkpoint as ocp
state = {{"w": jnp.arange(4.0)}}
jaxrank.checkpoint.save({str(tmp_path)!r}, 1, state)
big = {{"w": jnp.ones((64, 1024, 1024))}}
manager = ocp.CheckpointManager({str(tmp_path)!r}, options=ocp.CheckpointManagerOptions(create=True))
manager.save(2, args=ocp.args.StandardSave(big))  # asynchronous: still writing
os._exit(3)
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 3, result.stderr[-2000:]
  latest = jaxrank.checkpoint.latest_step(tmp_path)
  restored = jaxrank.checkpoint.restore(tmp_path, {"w": jnp.zeros(4)}, step=1)
  np.testing.assert_array_equal(restored["w"], jnp.arange(4.0))
  # The unfinished step 2 is never offered as the latest checkpoint.
  assert latest == 1


def test_restore_errors_and_prng_keys(tmp_path):
  with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
    jaxrank.checkpoint.restore(tmp_path, {"w": jnp.zeros(2)})
  state = {"rng": jax.random.key(7), "w": jnp.ones(3)}
  jaxrank.checkpoint.save(tmp_path, 4, state)
  back = jaxrank.checkpoint.restore(tmp_path, {"rng": jax.random.key(0), "w": jnp.zeros(3)})
  assert jax.random.key_impl(back["rng"]) == jax.random.key_impl(state["rng"])
  np.testing.assert_array_equal(jax.random.key_data(back["rng"]), jax.random.key_data(state["rng"]))
  with pytest.raises(FileNotFoundError, match="step 9"):
    jaxrank.checkpoint.restore(tmp_path, state, step=9)


def test_restore_onto_another_mesh(tmp_path):
  from multidevice import run_on_devices

  out = run_on_devices(f"""
    import jax, jax.numpy as jnp, numpy as np, optax, jaxrank
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
    import method_configs, toy_training
    config = method_configs.CONFIGS["adalora"](12)
    model, frozen, state, _ = toy_training.setup(config, 12)
    one = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    state = jax.device_put(state, NamedSharding(one, P()))
    jaxrank.checkpoint.save({str(tmp_path)!r}, 3, state)

    two = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {{"hidden": {{"kernel": P(None, "model"), "bias": P("model")}},
              "out": {{"kernel": P("model", None), "bias": P()}}}}
    shardings = jaxrank.variable_shardings(model, {{**frozen, **state["trainable"]}}, two, specs)
    target = dict(state)
    target["trainable"] = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state["trainable"], {{k: shardings[k] for k in state["trainable"]}})
    restored = jaxrank.checkpoint.restore({str(tmp_path)!r}, target)
    B = restored["trainable"]["lora"]["hidden"]["P"]
    assert B.sharding.spec == P(None, "model"), B.sharding
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, restored),
                 jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state))
    print("ok", B.sharding.spec)
  """)
  assert "ok" in out
