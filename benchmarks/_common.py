"""Shared helpers for the benchmark scripts: timing, tables, JSON output."""

import json
import os
import platform
import statistics
import time

import jax

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def median_time(fn, *, warmup: int = 2, repeats: int = 10) -> tuple[float, list]:
  """Median wall time of ``fn()`` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def matmul_peak(n: int = 2048, repeats: int = 10) -> tuple[float, float, list]:
  """This machine's float32 matmul rate now: ``(flop_per_s, median_s, times)`` of a jitted
  ``n``³ matmul (3 warm-ups). Measure it in the same run as what it is compared with."""
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  median, times = median_time(lambda: matmul(a, b).block_until_ready(), warmup=3,
                              repeats=repeats)
  return 2 * n ** 3 / median, median, times


def xla_cost(compiled) -> dict:
  """XLA's static count of a compiled program's work: ``{'flops', 'bytes accessed'}``."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes accessed": float(cost.get("bytes accessed", 0.0))}


def machine() -> dict:
  return {"platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "cpu_count": os.cpu_count(),
          "devices": [str(d) for d in jax.devices()]}


def table(rows: list[dict], columns: list[str]) -> str:
  widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  line = " | ".join(c.ljust(widths[c]) for c in columns)
  rule = "-|-".join("-" * widths[c] for c in columns)
  body = [" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
  return "\n".join([line, rule, *body])


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def write_json(name: str, payload: dict) -> str:
  os.makedirs(RESULTS, exist_ok=True)
  path = os.path.join(RESULTS, name)
  with open(path, "w") as f:
    json.dump({"machine": machine(), **payload}, f, indent=2)
  return path
