"""Planted-rank recovery: does each method put its rank budget where the teacher's update is?

The task: a frozen random tanh MLP of 5 Dense layers (width 16) is the "pretrained" model; the
teacher adds to each layer's kernel an update of known rank ``PLANTED = (1, 4, 0, 3, 2)``,
``ΔW_i = U_i diag(σ) V_iᵀ`` with orthonormal ``U_i, V_i`` and the spectrum

* ``flat``: every σ = 1;
* ``geometric``: σ_j = 0.7^j;
* ``noisy``: flat σ, plus Gaussian noise (std 0.1) on the train/eval targets.

The model's output is every layer's activation, concatenated (``--observe all``, the default,
a layer-wise distillation of the teacher): each layer's update is then identified by its own
output and the planted pattern is the only exact low-rank answer. With the last layer's output
alone (``--observe last``) later layers can absorb earlier layers' updates through the tanh
chain: full-rank LoRA trained to a test MSE of 2e-6 there puts a singular value of 0.13 into the
layer whose planted rank is 0, so "the planted ranks" is not a well-posed target.
Test targets are always the clean teacher outputs. Every method gets the same budget, built
by ``jaxrank.recipes.recipe`` with the library's defaults: capacity ``rank = 8`` per matrix,
``budget_rank = 2`` (10 ranks in all = the planted total), ``total_steps`` = the run's steps.
The methods are every recipe but ``frozen``: uniform LoRA at the budget (``lora@budget``),
the SVD-truncation baseline (``svd``) and the dynamic methods. The training loss is
``loss_scale × MSE`` (×1 and ×64: the defaults must not depend on the loss's scale); learning
rates 3e-3 and 1e-2; 1500 steps, batch 64.

Per row: the learned ranks, the allocation score ``1 − Σ|r − k| / (Σr + Σk)`` (1: the planted
pattern), whether the live total equals the budget, the test MSE and its ratio to the SVD
baseline's in the same setting. The summary groups methods × spectrum × scale × lr over seeds
(``mse_ratio``: geometric mean; ``pass_mse``: settings with ratio ≤ 2 or both MSEs < 1e-4).

Run:  python benchmarks/rank_recovery.py [--seeds 3] [--steps 1500] [--methods svd,sora]
      python benchmarks/rank_recovery.py --quick    # 1 seed, flat, ×1, lr 1e-2, 300 steps
"""

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from jaxrank import recipes
from jaxrank import tasks
from jaxrank import train

WIDTH, R_MAX = 16, 8
PLANTED = (1, 4, 0, 3, 2)
BUDGET_RANK = sum(PLANTED) // len(PLANTED)  # 2 per matrix = 10 in all = sum(PLANTED)
BUDGET_TOTAL = BUDGET_RANK * len(PLANTED)
assert BUDGET_TOTAL == sum(PLANTED)
NAMES = tuple(f"dense{i}" for i in range(len(PLANTED)))
SIGMA, RATIO, NOISE = 1.0, 0.7, 0.1
N_TRAIN, N_EVAL, N_TEST, BATCH = 4096, 512, 1024, 64
SPECTRA = ("flat", "geometric", "noisy")
METHODS = tuple(name for name in recipes.RECIPES if name != "frozen")
LABELS = {"lora": "lora@budget"}  # the LoRA recipe at budget_rank: uniform LoRA at the budget
REFERENCE = "svd"


OBSERVE = ("all", "last")


class MLP(nn.Module):
  observe: str = "all"  # every layer's activation, concatenated, or the last layer's only

  @nn.compact
  def __call__(self, x):
    outputs = []
    for name in NAMES[:-1]:
      x = jnp.tanh(nn.Dense(WIDTH, name=name)(x))
      outputs.append(x)
    outputs.append(nn.Dense(WIDTH, name=NAMES[-1])(x))
    return jnp.concatenate(outputs, -1) if self.observe == "all" else outputs[-1]


def _apply(model, variables, batch, rngs=None, deterministic=True):
  return model.apply(variables, batch["x"], rngs=rngs or {})


def _mse(outputs, batch):
  w = batch.get("weight", jnp.ones(outputs.shape[0]))
  per = jnp.mean((outputs - batch["y"]) ** 2, axis=-1)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def _metrics(outputs, batch):
  w = batch.get("weight", jnp.ones(outputs.shape[0]))
  return {"sse": jnp.sum(jnp.mean((outputs - batch["y"]) ** 2, axis=-1) * w),
          "count": jnp.sum(w)}


def make_train_task(loss_scale: float = 1.0) -> tasks.Task:
  """The MSE task; the training loss is ``loss_scale × MSE``, metrics stay the plain MSE."""
  scale = float(loss_scale)
  return tasks.Task(apply=_apply, loss=lambda o, b: scale * _mse(o, b), metrics=_metrics,
                    summarize=lambda s: {"mse": float(s["sse"]) / max(float(s["count"]), 1.0)})


def _orthonormal(rng, n, r):
  q, _ = np.linalg.qr(rng.normal(size=(n, r)))
  return q[:, :r]


def make_task(spectrum: str = "flat", seed: int = 0, observe: str = "all") -> dict:
  """Base model, frozen params, train/eval/test data, the planted pattern, the frozen MSE."""
  if spectrum not in SPECTRA:
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}.")
  if observe not in OBSERVE:
    raise ValueError(f"observe must be one of {OBSERVE}, got {observe!r}.")
  noise = NOISE if spectrum == "noisy" else 0.0
  base = MLP(observe=observe)
  params = base.init(jax.random.key(seed), jnp.ones((1, WIDTH)))["params"]
  rng = np.random.default_rng(1000 + seed)
  teacher = jax.tree.map(lambda x: x, params)
  for name, r in zip(NAMES, PLANTED):
    if r:
      sigma = SIGMA * (RATIO ** np.arange(r) if spectrum == "geometric" else np.ones(r))
      delta = _orthonormal(rng, WIDTH, r) @ np.diag(sigma) @ _orthonormal(rng, WIDTH, r).T
      teacher[name] = {**params[name],
                       "kernel": params[name]["kernel"] + jnp.asarray(delta, jnp.float32)}
  teacher_fn = jax.jit(lambda x: base.apply({"params": teacher}, x))

  def data(n, noisy):
    x = rng.normal(size=(n, WIDTH)).astype(np.float32)
    y = np.asarray(teacher_fn(x))
    if noisy and noise:
      y = y + noise * rng.normal(size=y.shape).astype(np.float32)
    return {"x": x, "y": y.astype(np.float32)}

  test = data(N_TEST, False)
  frozen = np.asarray(base.apply({"params": params}, test["x"]))
  return {"base": base, "params": params, "train": data(N_TRAIN, True),
          "eval": data(N_EVAL, True), "test": test, "planted": dict(zip(NAMES, PLANTED)),
          "spectrum": spectrum, "seed": seed,
          "frozen_test_mse": float(np.mean((frozen - test["y"]) ** 2))}


def allocation_score(learned, planted) -> float:
  """``1 − Σ|r − k| / (Σr + Σk)`` (1: the planted pattern exactly)."""
  num = sum(abs(learned.get(k, 0) - planted[k]) for k in planted)
  den = sum(learned.get(k, 0) for k in planted) + sum(planted.values())
  return 1.0 - num / max(den, 1)


def run(name: str, task: dict, *, steps: int, learning_rate: float, loss_scale: float) -> dict:
  """Trains recipe ``name`` at the budget on ``task``; returns one result row."""
  method = recipes.recipe(name, rank=R_MAX, budget_rank=BUDGET_RANK, total_steps=steps)
  result = train.fit(task["base"], {"params": task["params"]}, method,
                     make_train_task(loss_scale), train_data=task["train"],
                     eval_data=task["eval"], test_data=task["test"], steps=steps,
                     batch_size=BATCH, learning_rate=learning_rate, targets="all-linear",
                     seed=task["seed"], progress=False)
  learned = {k.split("/")[-1]: int(v) for k, v in result.rank_pattern.items()}
  live = sum(learned.values())
  return {"method": LABELS.get(name, name), "spectrum": task["spectrum"], "seed": task["seed"],
          "loss_scale": loss_scale, "learning_rate": learning_rate, "steps": steps,
          "planted": " ".join(map(str, PLANTED)),
          "ranks": " ".join(str(learned.get(k, 0)) for k in NAMES),
          "live_total": live, "budget_met": live == BUDGET_TOTAL,
          "alloc_score": allocation_score(learned, task["planted"]),
          "test_mse": result.final_metrics["test_mse"],
          "frozen_test_mse": task["frozen_test_mse"], "wall_s": result.wall_time}


def _setting(row):
  return (row["spectrum"], row["seed"], row["loss_scale"], row["learning_rate"])


def add_ratios(rows) -> None:
  """Adds ``mse_ratio``: the row's test MSE over the SVD baseline's in the same setting."""
  ref = {_setting(r): r["test_mse"] for r in rows if r["method"] == REFERENCE}
  for r in rows:
    m_ref = ref.get(_setting(r))
    r["mse_ratio"] = float("nan") if m_ref is None else r["test_mse"] / max(m_ref, 1e-30)


def summarize(rows, near_zero: float = 1e-4) -> list:
  """Per method × spectrum × loss scale × lr, over seeds: allocation, budget met, MSE ratio."""
  ref = {_setting(r): r["test_mse"] for r in rows if r["method"] == REFERENCE}
  groups = {}
  for r in rows:
    key = (r["method"], r["spectrum"], r["loss_scale"], r["learning_rate"])
    groups.setdefault(key, []).append(r)
  out = []
  for (name, spectrum, scale, lr), mine in groups.items():
    ratios = [r["mse_ratio"] for r in mine if not math.isnan(r["mse_ratio"])]
    passes = sum(int(r["mse_ratio"] <= 2 or (r["test_mse"] < near_zero
                                             and ref[_setting(r)] < near_zero))
                 for r in mine if not math.isnan(r["mse_ratio"]))
    out.append({
        "method": name, "spectrum": spectrum, "scale": scale, "lr": lr, "n": len(mine),
        "alloc_min": min(r["alloc_score"] for r in mine),
        "alloc_mean": statistics.mean(r["alloc_score"] for r in mine),
        "budget_met": f"{sum(r['budget_met'] for r in mine)}/{len(mine)}",
        "test_mse": statistics.mean(r["test_mse"] for r in mine),
        "mse_ratio": (math.exp(statistics.mean(math.log(max(x, 1e-30)) for x in ratios))
                      if ratios else float("nan")),
        "pass_mse": f"{passes}/{len(ratios)}" if ratios else "-"})
  return out


ROW_COLUMNS = ["method", "spectrum", "seed", "loss_scale", "learning_rate", "planted", "ranks",
               "live_total", "alloc_score", "test_mse", "wall_s"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated recipe names (default: {','.join(METHODS)})")
  parser.add_argument("--observe", choices=OBSERVE, default="all",
                      help="the model's output: every layer's activation (default) or the last")
  parser.add_argument("--quick", action="store_true",
                      help="a small run: 1 seed, flat spectrum, loss ×1, lr 1e-2, 300 steps")
  parser.add_argument("--json", default="rank_recovery.json",
                      help="file name under benchmarks/results (or an absolute path); '' for none")
  args = parser.parse_args()
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
  if REFERENCE not in methods:
    methods.append(REFERENCE)  # the MSE ratios need the SVD baseline
  spectra, scales, rates, seeds, steps = SPECTRA, (1.0, 64.0), (3e-3, 1e-2), args.seeds, args.steps
  if args.quick:
    spectra, scales, rates, seeds, steps = ("flat",), (1.0,), (1e-2,), 1, min(steps, 300)
  config = {"planted": PLANTED, "width": WIDTH, "rank": R_MAX, "budget_rank": BUDGET_RANK,
            "observe": args.observe, "spectra": spectra, "seeds": seeds, "loss_scales": scales,
            "learning_rates": rates, "steps": steps, "methods": methods}
  start, rows = time.time(), []
  for seed in range(seeds):  # seed-major: a stopped run holds whole grids of its first seeds
    for spectrum in spectra:
      task = make_task(spectrum, seed, args.observe)
      for scale in scales:
        for lr in rates:
          for name in methods:
            rows.append(run(name, task, steps=steps, learning_rate=lr, loss_scale=scale))
            print(_common.table([rows[-1]], ROW_COLUMNS).splitlines()[-1], flush=True)
      if args.json:  # after every task, so a long run that is stopped keeps what it measured
        add_ratios(rows)
        _common.write_json(args.json, {"config": {**config, "complete": False}, "rows": rows,
                                       "summary": summarize(rows)})
  add_ratios(rows)
  summary = summarize(rows)
  print(_common.table(rows, ROW_COLUMNS + ["mse_ratio"]))
  print()
  print(_common.table(summary, list(summary[0])), flush=True)
  print(f"{time.time() - start:.0f} s")
  if args.json:
    print("wrote", _common.write_json(args.json, {"config": {**config, "complete": True},
                                                  "rows": rows, "summary": summary}))


if __name__ == "__main__":
  main()
