"""Achieved FLOP/s of jaxrank's LoRA train step against this machine's measured f32 matmul peak.

The peak is measured in the same run: a jitted 2048³ float32 matmul (2·2048³ FLOP), median of
``--repeats`` after warm-up (``%_best_peak_xla``: against the fastest of those runs instead).
The step is ``jaxrank.train.fit``'s LoRA step (benchmarks/_steps.py) on MiniLM, batch
32 × 128, r = 8 on query and value, with dropout on and off. Work per step is counted two ways:
XLA's own count for the compiled step (``compiled.cost_analysis()['flops']``) and analytically
(:func:`analytic_lora_flops`, encoder only, 4096 tokens: every frozen matmul twice (forward,
input gradient), attention's products three times, LoRA's thin matmuls).
The step runs on one XLA device and data-parallel over ``--cpu-devices`` XLA devices splitting
the same cores (default one per core, as ``fit(..., mesh=...)``/the CLI's ``--cpu-devices``).
Where the time goes inside the step: ``benchmarks/step_profile.py``.

Run:  python benchmarks/flops.py [--repeats 10] [--cpu-devices 0]
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import _steps


def analytic_lora_flops(config, batch: int, seq: int, rank: int = 8) -> dict:
  """Encoder FLOPs of the LoRA step (frozen base, LoRA on q, v), by kind of work.

  Forward plus the activations' gradient: a frozen dense layer costs its forward matmul twice
  (forward, input gradient); attention's two forward products (QKᵀ, PV) need four in the
  backward pass (dQ, dK, dV, dP); no weight gradients except LoRA's own.
  """
  tokens = batch * seq
  d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
  dense = 2 * tokens * (4 * d * d + 2 * d * f)  # q, k, v, o and the two FFN matmuls
  attention = 2 * 2 * batch * seq * seq * d  # QK^T and PV
  lora = 2 * 2 * 2 * tokens * d * rank  # two adapters, two thin matmuls each
  work = {"dense": layers * 2 * dense, "attention": layers * 3 * attention,
          "lora": layers * 3 * lora}  # LoRA: forward, input and factor gradients
  work["total"] = sum(work.values())
  return work


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  _steps.add_cpu_devices_option(parser)
  args = parser.parse_args()
  devices = _steps.split_cpu(args.cpu_devices)  # before any JAX work

  peak, peak_t, peak_times = _common.matmul_peak(repeats=args.repeats)
  best_peak = peak * peak_t / min(peak_times)  # the fastest of the peak's runs: the strict bar
  print(f"f32 matmul 2048^3: {1e3 * peak_t:.1f} ms median -> {peak / 1e9:.0f} GFLOP/s",
        flush=True)

  base, params, config = _steps.load_minilm()
  batch_np = _steps.random_batch(32, 128, config.vocab_size)
  analytic = analytic_lora_flops(config, 32, 128)["total"]
  rows = []
  for dropout, count in [(d, c) for d in (True, False) for c in dict.fromkeys((1, devices))]:
    mesh = _steps.data_mesh(count)
    batch = _steps.place_batch(jax.tree.map(jnp.asarray, batch_np), mesh)
    built = _steps.build("lora", base, params, batch, dropout=dropout, mesh=mesh)
    compiled, compile_s = _steps.compile_step(built, batch)
    # XLA's count is per device: the step's total is the sum over the data-parallel devices
    xla_flops = _common.xla_cost(compiled)["flops"] * count
    t, times, _ = _steps.time_steps(compiled, built, batch, warmup=args.warmup,
                                    repeats=args.repeats)
    rows.append({
        "step": f"lora q,v r8 minilm b32x128 dropout {'on' if dropout else 'off'}",
        "xla_devices": count, "step_s": t, "xla_gflop": xla_flops / 1e9,
        "analytic_gflop": analytic / 1e9,
        "xla_gflop_per_s": xla_flops / t / 1e9, "analytic_gflop_per_s": analytic / t / 1e9,
        "peak_gflop_per_s": peak / 1e9, "%_peak_xla": 100 * xla_flops / t / peak,
        "%_peak_analytic": 100 * analytic / t / peak,
        "%_best_peak_xla": 100 * xla_flops / t / best_peak,
        "floor_s_at_peak": analytic / peak, "compile_s": compile_s, "times_s": times})
    print(f"dropout {'on' if dropout else 'off'}, {count} device(s): {t:.3f} s/step",
          flush=True)
  print(_common.table(rows, ["step", "xla_devices", "step_s", "xla_gflop", "analytic_gflop",
                             "xla_gflop_per_s", "analytic_gflop_per_s", "peak_gflop_per_s",
                             "%_peak_xla", "%_peak_analytic", "%_best_peak_xla",
                             "floor_s_at_peak"]))
  path = _common.write_json("flops.json", {"args": vars(args), "peak_matmul_s": peak_t,
                                           "peak_times_s": peak_times,
                                           "peak_gflop_per_s": peak / 1e9,
                                           "best_peak_gflop_per_s": best_peak / 1e9,
                                           "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
