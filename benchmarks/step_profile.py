"""Where the LoRA train step's time goes: an XLA:CPU profile of jaxrank's step, by kind of work.

The step is ``jaxrank.train.fit``'s (benchmarks/_steps.py) on MiniLM, batch 32 × 128, LoRA r = 8
on query and value. ``jax.profiler`` records ``--repeats`` steps; every executed XLA thunk is
attributed through the compiled HLO's ``op_name`` metadata to the model path it came from
(``.../layer/3/attention/self/query/...``), forward or backward (``transpose(jvp(...))``), and
to one of four kinds of work:

* ``dense``: the frozen q/k/v/o and feed-forward matmuls with their LoRA branches and whatever
  elementwise work XLA fused into them (bias, GELU's derivative, LayerNorm's backward);
* ``attention``: QKᵀ, softmax, dropout of the probabilities, PV and their gradients;
* ``elementwise``: LayerNorm, GELU, residual adds, hidden dropout, embeddings, outside matmuls;
* ``other``: the loss, head, optimizer and copies.

XLA runs independent thunks concurrently, so the kinds' times can add up to a little more than
the step's wall time (``sum of kinds``). Each kind's share of the step is printed with its
analytic FLOPs (``flops.analytic_lora_flops``)
and the rate that implies, against the float32 matmul peak measured in the same run. With
``--cpu-devices``, times, FLOPs and rates are per device, against each device's share of the
peak.

With ``--methods lora,sora,adalora`` each further method's profile is compared with the first's,
component by component: where a method's step is slower than LoRA's, this shows which work
grew.

Run:  python benchmarks/step_profile.py [--repeats 3]
      python benchmarks/step_profile.py --cpu-devices 0   # data-parallel, one device per core
      python benchmarks/step_profile.py --methods lora,sora,adalora --dropout on
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import _steps
from benchmarks import flops

_OP_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")
_PROJECTIONS = ("/query", "/key", "/value")


def kind_of(op_name: str, is_matmul: bool) -> str:
  """``dense``, ``attention``, ``elementwise`` or ``other`` for one thunk's HLO op_name."""
  path = op_name.split("wrapped_model/")[-1] if "wrapped_model/" in op_name else ""
  if "/layer/" not in path:
    return "elementwise" if "embeddings" in path else "other"
  if "attention/self" in path and not any(p + "/" in path or path.endswith(p)
                                          for p in _PROJECTIONS):
    return "attention"
  return "dense" if is_matmul else "elementwise"


def component_of(op_name: str) -> str:
  path = op_name.split("wrapped_model/")[-1]
  path = re.sub(r"layer/\d+/", "", path)
  path = re.sub(r"^bert/(encoder/)?", "", path)
  return "/".join(path.split("/")[:3])


def profile(compiled, frozen, state, batch, repeats: int) -> tuple[list, float]:
  """``([(thunk_name, microseconds), ...], wall_s_per_step)`` over ``repeats`` traced steps."""
  directory = tempfile.mkdtemp(prefix="jaxrank-profile-")
  jax.profiler.start_trace(directory, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(repeats):
    state, loss = compiled(frozen, state, batch)
  jax.block_until_ready(loss)
  wall = (time.perf_counter() - start) / repeats
  jax.profiler.stop_trace()
  trace = glob.glob(os.path.join(directory, "**", "*.json.gz"), recursive=True)[0]
  with gzip.open(trace) as f:
    events = json.load(f)["traceEvents"]
  shutil.rmtree(directory, ignore_errors=True)
  return [(e["name"], e["dur"]) for e in events if e.get("ph") == "X"], wall


def profile_step(built, batch, repeats: int, devices: int = 1) -> dict:
  """Profiles ``built``'s compiled step: wall time and thunk time by kind and by component
  (per device: a data-parallel step over ``devices`` runs every thunk once on each)."""
  compiled, _ = _steps.compile_step(built, batch)
  op_names = {}
  for line in compiled.as_text().splitlines():
    match = _OP_NAME.match(line)
    if match:
      op_names.setdefault(match.group(1), match.group(2))
  state = built.state
  for _ in range(2):  # warm-up
    _, state = _steps.timed_step(compiled, built.frozen, state, batch)
  events, wall = profile(compiled, built.frozen, state, batch, repeats)
  by_kind, by_component = collections.Counter(), collections.Counter()
  for name, micros in events:
    if name not in op_names:
      continue
    is_matmul = name.startswith(("dot", "ynn_fusion", "xnn_fusion", "onednn"))
    kind = kind_of(op_names[name], is_matmul)
    direction = "backward" if "transpose(" in op_names[name] else "forward"
    seconds = micros / 1e6 / repeats / devices
    by_kind[kind] += seconds
    by_component[(direction, kind, component_of(op_names[name]))] += seconds
  return {"wall_s": wall, "by_kind": dict(by_kind), "by_component": by_component}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default="lora",
                      help="comma-separated (lora, sora, adalora, salora, alora); every method "
                           "after the first is also compared with the first, component by "
                           "component")
  parser.add_argument("--dropout", default="off,on", help="off, on or off,on")
  _steps.add_cpu_devices_option(parser, default=1)
  args = parser.parse_args()
  devices = _steps.split_cpu(args.cpu_devices)  # before any JAX work
  mesh = _steps.data_mesh(devices)

  peak, _, _ = _common.matmul_peak()
  share = peak / devices  # each data-parallel device's share of the machine's peak
  base, params, config = _steps.load_minilm()
  batch = _steps.place_batch(
      jax.tree.map(jnp.asarray, _steps.random_batch(32, 128, config.vocab_size)), mesh)
  # per device: the data-parallel devices share the batch's work
  work = {k: v / devices for k, v in flops.analytic_lora_flops(config, 32, 128).items()}
  methods = args.methods.split(",")
  rows, detail, differences = [], {}, []
  for label in args.dropout.split(","):
    profiles = {}
    for method in methods:
      built = _steps.build(method, base, params, batch, dropout=label == "on", mesh=mesh)
      profiles[method] = result = profile_step(built, batch, args.repeats, devices)
      wall, by_kind = result["wall_s"], result["by_kind"]
      for kind in ("dense", "attention", "elementwise", "other"):
        analytic = {"dense": work["dense"] + work["lora"],
                    "attention": work["attention"]}.get(kind)
        t = by_kind.get(kind, 0.0)
        rows.append({"method": method, "dropout": label, "kind": kind, "time_s": t,
                     "%_of_step": 100 * t / wall,
                     "analytic_gflop": analytic / 1e9 if analytic else None,
                     "gflop_per_s": analytic / t / 1e9 if analytic and t else None,
                     "%_of_peak": 100 * analytic / t / share if analytic and t else None})
      # XLA runs independent thunks concurrently: the kinds may add up to more than the step
      rows.append({"method": method, "dropout": label, "kind": "sum of kinds",
                   "time_s": sum(by_kind.values()),
                   "%_of_step": 100 * sum(by_kind.values()) / wall})
      rows.append({"method": method, "dropout": label, "kind": "step (traced)", "time_s": wall,
                   "%_of_step": 100.0, "analytic_gflop": work["total"] / 1e9,
                   "gflop_per_s": work["total"] / wall / 1e9,
                   "%_of_peak": 100 * work["total"] / wall / share})
      key = f"{method}, dropout {label}"
      detail[key] = [{"direction": d, "kind": k, "component": c, "time_s": t}
                     for (d, k, c), t in result["by_component"].most_common()]
      print(f"{key}: {wall:.3f} s/step; top components", flush=True)
      print(_common.table(detail[key][:12], ["direction", "kind", "component", "time_s"]))
    first = profiles[methods[0]]["by_component"]
    for method in methods[1:]:
      other = profiles[method]["by_component"]
      change = {k: other.get(k, 0.0) - first.get(k, 0.0) for k in set(first) | set(other)}
      largest = sorted(change.items(), key=lambda kv: -abs(kv[1]))[:8]
      diff_rows = [{"method": method, "vs": methods[0], "dropout": label, "direction": d,
                    "kind": k, "component": c, "delta_ms": 1e3 * v} for (d, k, c), v in largest]
      diff_rows.append({"method": method, "vs": methods[0], "dropout": label,
                        "direction": "all", "kind": "all", "component": "(all thunks)",
                        "delta_ms": 1e3 * (sum(other.values()) - sum(first.values()))})
      differences += diff_rows
      print(f"\n{method} - {methods[0]}, dropout {label}: largest differences by component")
      print(_common.table(diff_rows, ["direction", "kind", "component", "delta_ms"]))
  print(f"\nf32 matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s")
  print(_common.table(rows, ["method", "dropout", "kind", "time_s", "%_of_step",
                             "analytic_gflop", "gflop_per_s", "%_of_peak"]))
  name = "step_profile" if methods == ["lora"] else f"step_profile_{'_'.join(methods)}"
  name += f"_{devices}devices.json" if devices > 1 else ".json"
  path = _common.write_json(name, {"args": vars(args), "peak_gflop_per_s": peak / 1e9,
                                   "rows": rows, "components": detail,
                                   "differences": differences})
  print("wrote", path)


if __name__ == "__main__":
  main()
