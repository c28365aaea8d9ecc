"""Why jaxrank trains data-parallel over one XLA device per core on CPU: attention's matmuls.

Attention multiplies many small matrices at once: MiniLM at batch 32 × 128 makes 32 × 12 = 384
products of 128 × 32 by 32 × 128 (QKᵀ), and as many of 128 × 128 by 128 × 32 (PV). This script
times those batched matmuls (``jnp.einsum``, jitted) on one XLA:CPU device, on one device
restricted to one core (``taskset`` in a subprocess, when available), and split along the batch
over ``--cpu-devices`` devices (default: one per core), next to PyTorch's ``bmm`` on the same
cores and a plain 4096 × 384 × 1536 matmul (the feed-forward shape) as the reference. If the
one-device batched matmul runs no faster on all cores than on one, XLA:CPU runs it on one
core; a device per core is what spreads it.

Run:  python benchmarks/batched_matmul.py [--repeats 20] [--cpu-devices 0]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from benchmarks import _steps

BATCH, LENGTH, HEAD_DIM = 32 * 12, 128, 32
SHAPES = {  # name: (lhs shape, rhs shape, einsum)
    "QK^T": ((BATCH, LENGTH, HEAD_DIM), (BATCH, LENGTH, HEAD_DIM), "nqd,nkd->nqk"),
    "PV": ((BATCH, LENGTH, LENGTH), (BATCH, LENGTH, HEAD_DIM), "nqk,nkd->nqd"),
    "dense 4096x384x1536": ((4096, 384), (384, 1536), "md,df->mf"),
}


def flops(name: str) -> float:
  """2 × the product of every index's size: one multiply-add per index combination."""
  lhs_shape, rhs_shape, spec = SHAPES[name]
  inputs = spec.split("->")[0].split(",")
  sizes = {**dict(zip(inputs[0], lhs_shape)), **dict(zip(inputs[1], rhs_shape))}
  return 2.0 * float(np.prod(list(sizes.values())))


def time_jax(name: str, mesh, repeats: int) -> float:
  lhs_shape, rhs_shape, spec = SHAPES[name]
  rng = np.random.default_rng(0)
  lhs = rng.standard_normal(lhs_shape, np.float32)
  rhs = rng.standard_normal(rhs_shape, np.float32)
  if mesh is not None:  # split the (batch or row) axis over the devices
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    lhs = jax.device_put(lhs, split)
    rhs = jax.device_put(rhs, split if len(rhs_shape) == 3 else whole)
  else:
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  fn = jax.jit(lambda a, b: jnp.einsum(spec, a, b)).lower(lhs, rhs).compile()
  median, _ = _common.median_time(lambda: fn(lhs, rhs).block_until_ready(), warmup=3,
                                  repeats=repeats)
  return median


def time_torch(name: str, threads: int, repeats: int) -> float:
  import torch
  torch.set_num_threads(threads)
  lhs_shape, rhs_shape, spec = SHAPES[name]
  rng = np.random.default_rng(0)
  lhs = torch.tensor(rng.standard_normal(lhs_shape, np.float32))
  rhs = torch.tensor(rng.standard_normal(rhs_shape, np.float32))
  median, _ = _common.median_time(lambda: torch.einsum(spec, lhs, rhs), warmup=3,
                                  repeats=repeats)
  return median


def one_core(repeats: int) -> dict:
  """The one-device timings again in a subprocess pinned to core 0 (None without taskset)."""
  if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
    return {}
  code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}"
          f" + '/..'); from benchmarks import batched_matmul as b; "
          f"print(json.dumps({{n: b.time_jax(n, None, {repeats}) for n in b.SHAPES}}))")
  out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], check=True,
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=20)
  _steps.add_cpu_devices_option(parser)
  args = parser.parse_args()
  devices = _steps.split_cpu(args.cpu_devices)  # before any JAX work
  cores = os.cpu_count() or 1
  pinned = one_core(args.repeats)
  rows = []
  for name in SHAPES:
    work = flops(name)
    timings = {"jax 1 device": time_jax(name, None, args.repeats),
               "jax 1 device, 1 core": pinned.get(name),
               f"jax {devices} devices": time_jax(name, _steps.data_mesh(devices), args.repeats),
               f"torch {cores} threads": time_torch(name, cores, args.repeats)}
    for how, seconds in timings.items():
      if seconds is not None:
        rows.append({"matmul": name, "run": how, "ms": 1e3 * seconds,
                     "gflop_per_s": work / seconds / 1e9})
    print(_common.table(rows[-len(timings):], ["matmul", "run", "ms", "gflop_per_s"]),
          flush=True)
  print(_common.table(rows, ["matmul", "run", "ms", "gflop_per_s"]))
  print("wrote", _common.write_json("batched_matmul.json",
                                    {"args": vars(args), "cpu_devices": devices, "rows": rows}))


if __name__ == "__main__":
  main()
