"""AB-LoRA scoring time: batched (vmap over gate masks, chunked) vs a naive Python loop.

Both compute IS(r) = S(M) - S(M∖r) + S(M_r) (ALoRA eq. 6) for every live rank: ``2R + 1``
forward passes on one validation batch (the paper's |B_val| = 32). The naive loop calls one
jitted loss ``2R + 1`` times from Python; the batched scorer is one compiled call that
evaluates ``2 * chunk_size`` gate masks per vmapped step. Times are medians of several runs
after a compile run. Results: a table on stdout and ``benchmarks/results/alora_scoring.json``.

Run:  python benchmarks/alora_scoring.py [--repeats 5]
"""

import argparse
import json
import os
import pathlib
import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxrank

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median_time  # noqa: E402
from jaxrank import ALoRA, ablation_scores, ablation_scores_naive, live_rank_total

CONFIGS = (
    # name, layers, width, capacity, initial rank, batch
    ("mlp-4x128-r8", 4, 128, 16, 8, 32),
    ("mlp-8x256-r8", 8, 256, 16, 8, 32),
    ("mlp-16x32-r8", 16, 32, 16, 8, 32),
)
CHUNKS = (8, 32, 128)


class DeepMLP(nn.Module):
  layers: int
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = nn.gelu(nn.Dense(self.width, name=f"dense_{i}")(x))
    return nn.Dense(10, name="head")(x)


def _setup(layers, width, capacity, initial_rank, batch):
  spec = ALoRA(rank=capacity, initial_rank=initial_rank)
  model = jaxrank.wrap(DeepMLP(layers, width), targets=r"dense_\d+", adapter=spec)
  x = jax.random.normal(jax.random.key(0), (batch, width))
  labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  variables = model.init(jax.random.key(2), x)
  # trained-looking adapters: non-zero B so every rank matters
  lora = jax.tree.map(lambda a: 0.05 * jax.random.normal(jax.random.key(3), a.shape),
                      variables["lora"])
  variables = {**variables, "lora": lora}

  def loss_fn(v, b):  # S = -cross-entropy
    logits = model.apply(v, b[0])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), b[1][:, None], 1))

  return model, variables, (x, labels), loss_fn


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                            "alora_scoring.json"))
  args = parser.parse_args()
  rows = []
  for name, layers, width, capacity, initial_rank, batch in CONFIGS:
    model, variables, data, loss_fn = _setup(layers, width, capacity, initial_rank, batch)
    live = live_rank_total(model, variables)

    def naive():
      scores = ablation_scores_naive(loss_fn, model, variables, data)
      return jax.block_until_ready(scores)

    naive_s, naive_all = median_time(naive, warmup=1, repeats=args.repeats)
    reference = naive()
    for chunk in CHUNKS:
      if chunk > live:
        continue

      def batched(chunk=chunk):
        scores = ablation_scores(loss_fn, model, variables, data, chunk_size=chunk)
        return jax.block_until_ready(scores)

      batched_s, batched_all = median_time(batched, warmup=1, repeats=args.repeats)
      got = batched()
      max_diff = max(float(np.nanmax(np.abs(np.asarray(got[p]) - np.asarray(reference[p]))))
                     for p in got)
      rows.append(dict(config=name, layers=layers, width=width, capacity=capacity,
                       live_ranks=live, forward_passes=2 * live + 1, batch=batch,
                       chunk_size=chunk, naive_median_s=naive_s, batched_median_s=batched_s,
                       speedup=naive_s / batched_s, max_abs_score_diff=max_diff,
                       naive_runs_s=naive_all, batched_runs_s=batched_all))
  header = (f"{'config':14s} {'live R':>6s} {'passes':>6s} {'chunk':>5s} {'naive ms':>9s} "
            f"{'batched ms':>10s} {'speedup':>7s} {'max |Δ|':>8s}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:14s} {r['live_ranks']:6d} {r['forward_passes']:6d} {r['chunk_size']:5d} "
          f"{1e3 * r['naive_median_s']:9.1f} {1e3 * r['batched_median_s']:10.1f} "
          f"{r['speedup']:7.1f} {r['max_abs_score_diff']:8.1e}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
              jax=jax.__version__, machine=platform.machine(), repeats=args.repeats,
              timing="median wall-clock seconds after one compile/warm-up run")
  out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
