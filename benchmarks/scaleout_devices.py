"""Step time against (simulated) device count: a SANITY FIGURE ONLY.

Simulated CPU devices share the same 2 physical cores, so this shows that the sharded step
runs and how much partitioning overhead it adds, not a speed-up. Each device count runs in its
own process (the device-count flag must precede the jax import).

python benchmarks/scaleout_devices.py   -> table on stdout, benchmarks/results/scaleout_devices.json
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import table, write_json  # noqa: E402

WORKER = r"""
import json, sys, os
sys.path.insert(0, {bench!r})
import flax.linen as nn, jax, jax.numpy as jnp, optax, jaxrank
from jax.sharding import NamedSharding, PartitionSpec as P
from _common import median_time

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = nn.gelu(nn.Dense(512, name=f"dense_{{i}}")(x))
    return nn.Dense(16, name="head")(x)

n = jax.device_count()
mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=8))
x = jax.random.normal(jax.random.key(0), (256, 512))
variables = model.init(jax.random.key(1), x[:1])
frozen, trainable = jaxrank.split_variables(variables)
tx = optax.adamw(1e-3)
opt_state = tx.init(trainable)
replicated = NamedSharding(mesh, P())
frozen, trainable, opt_state = jax.device_put((frozen, trainable, opt_state), replicated)
x = jax.device_put(x, NamedSharding(mesh, P("data")))

@jax.jit
def step(trainable, opt_state, x):
  loss, g = jax.value_and_grad(lambda t: jnp.mean(model.apply({{**frozen, **t}}, x) ** 2))(trainable)
  updates, opt_state = tx.update(g, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss

state = [trainable, opt_state]
def run():
  state[0], state[1], loss = step(state[0], state[1], x)
  loss.block_until_ready()
median, times = median_time(run, warmup=3, repeats=15)
print(json.dumps({{"devices": n, "median_s": median, "times_s": times}}))
"""


def main():
  bench = os.path.dirname(os.path.abspath(__file__))
  rows = []
  for devices in (1, 2, 4, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", WORKER.format(bench=bench)], env=env,
                         capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  base = rows[0]["median_s"]
  for row in rows:
    row["ratio_vs_1_device"] = row["median_s"] / base
  print("LoRA train step, 4x512 MLP, batch 256, data parallel over simulated CPU devices")
  print("(sanity figure only: all simulated devices share the same physical cores)")
  print(table(rows, ["devices", "median_s", "ratio_vs_1_device"]))
  print("wrote", write_json("scaleout_devices.json", {"rows": rows}))


if __name__ == "__main__":
  main()
