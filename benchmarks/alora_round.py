"""Time of one ALoRA round step against the scoring chunk size (ranks per vmapped call).

An ALoRA round scores every live rank with 2R + 1 forward passes on the scoring rows (eq. 6),
vmapped over ``chunk_size`` ranks at a time (``jaxrank.alora(chunk_size=...)``), and
``lax.map`` over the chunks. This times the train step that runs the round (``jaxrank.train``'s
step as ``jaxrank.recipes.alora_recipe(...)`` builds it: MiniLM, batch 32 × 128, r = 8 on
query and value, 8 scoring rows) from a copied pre-round state, twice per chunk size, next to a
normal step of the same program.

Run:  python benchmarks/alora_round.py [--chunks 32,8,4,2,1]
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
from jaxrank import recipes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--chunks", default="32,8,4,2,1")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  base, params, config = _steps.load_minilm()
  batch = jax.tree.map(jnp.asarray, _steps.random_batch(32, 128, config.vocab_size))
  steps = 16  # alora_recipe's K1 = steps // 4: the round runs in the 4th step
  rows = []
  for chunk in [int(c) for c in args.chunks.split(",")]:
    method = recipes.alora_recipe(rank=8, budget_rank=4, chunk_size=chunk, total_steps=steps)
    built = _steps.build("alora", base, params, batch, steps=steps, method=method)
    compiled, _ = _steps.compile_step(built, batch)
    state = built.state
    while int(state.step) < steps // 4 - 1:
      _, state = _steps.timed_step(compiled, built.frozen, state, batch)
    round_times = [_steps.timed_step(compiled, built.frozen, _steps.copy_tree(state), batch)[0]
                   for _ in range(args.repeats)]
    _, after = _steps.timed_step(compiled, built.frozen, state, batch)  # the round
    normal, _ = _steps.timed_step(compiled, built.frozen, after, batch)  # then a normal step
    row = {"chunk_size": chunk, "sequences_per_call": 2 * chunk * 8,
           "round_step_s": statistics.median(round_times), "normal_step_s": normal,
           "round_in_normal_steps": statistics.median(round_times) / normal,
           "round_times_s": round_times}
    rows.append(row)
    print(_common.table([row], list(row)[:5]), flush=True)
  print(_common.table(rows, ["chunk_size", "sequences_per_call", "round_step_s", "normal_step_s",
                             "round_in_normal_steps"]))
  print("wrote", _common.write_json("alora_round.json", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
  main()
