"""Train-step time of every rank method against jaxrank's plain LoRA, same model and batch.

Every method's step is the one ``jaxrank.train.fit`` runs (``benchmarks/_steps.py``): task loss +
the method's penalty, its optax transform (AdaLoRA: sensitivity EMAs + top-budget allocation every
step; SaLoRA: hard-concrete sampling in the forward, density Lagrangian, Lagrangian ascent; SoRA:
proximal gate step), AdamW on the head, dropout on. All adapters have the same shapes
(``r = 8`` on query and value), so the difference is the method's own work.

Steps of all methods are *interleaved* (one step of each method per iteration, in an order
rotated every iteration) so that load from other jobs hits all of them alike; the overhead is
the median over iterations of ``t_method / t_lora`` of the same iteration, printed with the
interquartile range of those ratios (``overhead_iqr_%``: the step-to-step noise). ALoRA is amortised over one cycle:
``(K2 · t_normal + t_round) / K2 / t_lora − 1`` with ``t_round`` the step that also scores
every live rank (2R+1 forwards on 8 validation rows), prunes and reallocates; ``K2`` defaults to
what ``jaxrank finetune --steps 1000`` uses (250). Also timed alone: each method's optax
transform (``tx.update``) on the real gradient tree, and XLA's static count of each compiled
step's FLOPs and bytes accessed against LoRA's (noise-free: what work the method adds), to see
what bounds a missed target. ``benchmarks/step_profile.py --methods lora,sora`` profiles where.

Run:  python benchmarks/method_overhead.py [--quick] [--repeats 20] [--models minilm,bert-base]
``--quick``: BERT-base at batch 8 × 128 instead of 32 × 128.
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import _steps
from jaxrank import ALoRAState

TARGETS = {"sora": 2.0, "adalora": 3.0, "salora": 5.0, "alora": 10.0}


def bench_model(label, base, params, config, *, batch_size, seq_len, warmup, repeats,
                round_repeats, k2):
  batch = _steps.random_batch(batch_size, seq_len, config.vocab_size)
  batch = jax.tree.map(jnp.asarray, batch)
  calls = warmup + repeats
  # ALoRA: its first round is at the (calls + 2)-th optimizer step: alora_recipe's K1 = steps // 4
  alora_steps = 4 * (calls + 2)
  built, compile_s, cost = {}, {}, {}
  for name in _steps.METHODS:
    steps = alora_steps if name == "alora" else 1000
    b = _steps.build(name, base, params, batch, steps=steps)
    b.step, compile_s[name] = _steps.compile_step(b, batch)
    cost[name] = _common.xla_cost(b.step)
    built[name] = b
    print(f"[{label}] compiled {name} in {compile_s[name]:.1f}s", flush=True)

  times = {n: [] for n in built}
  names = list(built)
  for i in range(calls):
    # rotate the order every iteration so that no method always runs right after another
    for name in names[i % len(names):] + names[:i % len(names)]:
      b = built[name]
      t, b.state = _steps.timed_step(b.step, b.frozen, b.state, batch)
      times[name].append(t)
  times = {n: t[warmup:] for n, t in times.items()}
  lora = times["lora"]

  # ALoRA round step: advance to one step before the round, then time the round from copies.
  a = built["alora"]
  while int(a.state.step) < calls + 1:
    _, a.state = _steps.timed_step(a.step, a.frozen, a.state, batch)
  snapshot = _steps.copy_tree(a.state)
  round_times, round_lora = [], []
  for j in range(1 + round_repeats):
    t, new_state = _steps.timed_step(a.step, a.frozen, _steps.copy_tree(snapshot), batch)
    b = built["lora"]
    tl, b.state = _steps.timed_step(b.step, b.frozen, b.state, batch)
    if j:
      round_times.append(t)
      round_lora.append(tl)
  is_alora = lambda x: isinstance(x, ALoRAState)
  found = [s for s in jax.tree.leaves(new_state.opt_state, is_leaf=is_alora) if is_alora(s)]
  rounds_done = int(found[0].rounds_done)  # 1: the timed step did run a round

  # each method's optax transform alone, on its real gradient tree
  transform_times = {}
  for name, b in built.items():
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), b.state.trainable)
    opt_state = b.tx.init(b.state.trainable)  # step 0: ALoRA's round branch is not taken
    fn = jax.jit(b.transform).lower(grads, opt_state, b.state.trainable).compile()
    med, _ = _common.median_time(
        lambda: jax.block_until_ready(fn(grads, opt_state, b.state.trainable)), warmup=2,
        repeats=repeats)
    transform_times[name] = med

  rows = []
  lora_med = statistics.median(lora)
  for name in built:
    ratios = [t / l for t, l in zip(times[name], lora)]
    med = statistics.median(times[name])
    quartiles = statistics.quantiles(ratios, n=4)
    row = {"model": label, "method": name, "step_s": med,
           "overhead_%": 100 * (statistics.median(ratios) - 1),
           "overhead_iqr_%": f"{100 * (quartiles[0] - 1):.1f}..{100 * (quartiles[2] - 1):.1f}",
           "transform_ms": 1e3 * transform_times[name],
           "transform_%_of_lora_step": 100 * transform_times[name] / lora_med,
           "compile_s": compile_s[name], "target_%": TARGETS.get(name)}
    if name != "alora":  # XLA's static count would include ALoRA's round branch
      for key, column in (("flops", "xla_flops_vs_lora_%"), ("bytes accessed",
                                                           "xla_bytes_vs_lora_%")):
        row[column] = 100 * (cost[name][key] / cost["lora"][key] - 1)
    if name == "alora":
      normal_ratio = statistics.median(ratios)
      round_ratio = statistics.median([t / l for t, l in zip(round_times, round_lora)])
      amortised = (k2 * normal_ratio + round_ratio) / k2
      row.update({"overhead_%": 100 * (amortised - 1),
                  "normal_step_overhead_%": 100 * (normal_ratio - 1),
                  "round_step_s": statistics.median(round_times),
                  "round_in_lora_steps": round_ratio, "k2": k2,
                  "k2_for_10%": (round_ratio - 1) / max(1.1 - normal_ratio, 1e-9)
                  if normal_ratio < 1.1 else None,
                  "rounds_done_in_round_step": rounds_done})
    if name in TARGETS:
      row["met"] = "yes" if row["overhead_%"] <= TARGETS[name] else "NO"
    row["times_s"] = times[name]
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--round-repeats", type=int, default=2)
  parser.add_argument("--k2", type=int, default=250,
                      help="ALoRA recovery steps per round (alora_recipe at --steps 1000: 250)")
  parser.add_argument("--quick", action="store_true", help="BERT-base at batch 8 x 128")
  parser.add_argument("--models", default="minilm,bert-base",
                      help="comma-separated: minilm, bert-base")
  args = parser.parse_args()

  rows = []
  models = args.models.split(",")
  if "minilm" in models:
    base, params, config = _steps.load_minilm()
    rows += bench_model("minilm b32x128", base, params, config, batch_size=32, seq_len=128,
                        warmup=args.warmup, repeats=args.repeats,
                        round_repeats=args.round_repeats, k2=args.k2)
    del base, params
  if "bert-base" in models:
    bsz = 8 if args.quick else 32
    base, params, config = _steps.load_bert_base()
    rows += bench_model(f"bert-base(random) b{bsz}x128", base, params, config, batch_size=bsz,
                        seq_len=128, warmup=args.warmup, repeats=args.repeats,
                        round_repeats=args.round_repeats, k2=args.k2)
  columns = ["model", "method", "step_s", "overhead_%", "overhead_iqr_%", "target_%", "met",
             "transform_ms", "transform_%_of_lora_step", "xla_flops_vs_lora_%",
             "xla_bytes_vs_lora_%", "compile_s"]
  print(_common.table(rows, columns))
  alora_rows = [r for r in rows if r["method"] == "alora"]
  print(_common.table(alora_rows, ["model", "normal_step_overhead_%", "round_step_s",
                                   "round_in_lora_steps", "k2", "overhead_%", "k2_for_10%",
                                   "rounds_done_in_round_step"]))
  path = _common.write_json(f"method_overhead_{'_'.join(models)}.json",
                            {"args": vars(args), "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
