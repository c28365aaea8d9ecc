"""Step time against (simulated) device count and process count: a SANITY FIGURE ONLY.

Simulated CPU devices share the same 2 physical cores, so this shows that the sharded step
runs and how much partitioning overhead it adds, not a speed-up. Each device count runs in its
own process (the device-count flag must precede the jax import). The multi-process rows run
the same global batch as a real ``jax.distributed`` job of local CPU processes (gloo
collectives, each process feeding its rows with ``jax.make_array_from_process_local_data``):
4 devices as 1 x 4, 2 x 2 and 4 x 1 (processes x devices); they show what the cross-process
all-reduce costs on one machine, not a pod's interconnect.

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
import jaxrank
if {processes} > 1:
  jaxrank.distributed.initialize("localhost:{port}", {processes}, int(sys.argv[1]))
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
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
frozen, trainable, opt_state = jaxrank.distributed.replicate((frozen, trainable, opt_state), mesh)
rows = jaxrank.distributed.process_rows(mesh, 256)
x = jaxrank.distributed.local_batch_placement(mesh, 256)({{"x": np.asarray(x)[rows]}})["x"]

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
print(json.dumps({{"processes": jax.process_count(), "devices": n, "median_s": median,
                  "times_s": times}}))
"""


def _run(processes: int, devices_per_process: int, bench: str) -> dict:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  code = WORKER.format(bench=bench, processes=processes, port=port)
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    if p.returncode:
      raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
  row = json.loads(outputs[0][0].strip().splitlines()[-1])  # process 0's timing
  row["devices_per_process"] = devices_per_process
  return row


def main():
  bench = os.path.dirname(os.path.abspath(__file__))
  rows = [_run(1, devices, bench) for devices in (1, 2, 4, 8)]
  rows += [_run(processes, 4 // processes, bench) for processes in (2, 4)]
  base = rows[0]["median_s"]
  for row in rows:
    row["ratio_vs_1_device"] = row["median_s"] / base
  print("LoRA train step, 4x512 MLP, batch 256, data parallel over simulated CPU devices")
  print("(sanity figure only: all simulated devices and processes share the same physical "
        "cores)")
  print(table(rows, ["processes", "devices_per_process", "devices", "median_s",
                     "ratio_vs_1_device"]))
  print("wrote", write_json("scaleout_devices.json", {"rows": rows}))


if __name__ == "__main__":
  main()
