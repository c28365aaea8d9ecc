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
