"""Peak memory of each method's train step against plain LoRA, from XLA's compiled memory stats.

For the jitted step of every method (``jaxrank.train.fit``'s step, benchmarks/_steps.py: MiniLM,
batch 32 × 128, r = 8 on query and value, dropout on, state donated) the compiled executable's
``memory_analysis()`` gives the argument bytes (frozen weights + batch + trainable state +
optimizer state), output bytes, bytes aliased between them (the donated state) and the temporary
buffer (activations, gradients, the method's scratch). Peak ≈ arguments + outputs − aliased +
temporaries. These are static numbers of the compiled program: deterministic on CPU, no timing.
ALoRA is listed twice: with ``jaxrank.recipes.alora_recipe``'s default scoring chunk (1 rank
per vmapped call on CPU) and with ``chunk_size=32`` (its default on accelerators); its round runs inside the
step's ``lax.cond``, so its scoring forwards count towards the step's peak.

Run:  python benchmarks/memory.py [--bert-base]
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
from jaxrank import recipes

MB = 2 ** 20
ALORA_OTHER_CHUNK = 32


def _nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def measure(label, base, params, config, batch_size, seq_len):
  batch = jax.tree.map(jnp.asarray, _steps.random_batch(batch_size, seq_len, config.vocab_size))
  rows = []
  # ALoRA's round scores chunk_size ranks per vmapped call (2 x chunk x scoring rows sequences
  # at once): the recipe's default (1 on CPU) and 32 (its default on accelerators), to show that
  # knob's effect on the peak
  other_chunk = recipes.alora_recipe(rank=8, budget_rank=4, chunk_size=ALORA_OTHER_CHUNK,
                                     total_steps=1000)
  variants = [(name, None) for name in _steps.METHODS]
  variants.append((f"alora chunk {ALORA_OTHER_CHUNK}", other_chunk))
  for name, method in variants:
    built = _steps.build(name, base, params, batch, steps=1000, method=method)
    stats = _steps.compile_step(built, batch)[0].memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    rows.append({"model": label, "method": name,
                 "trainable_MB": _nbytes(built.state.trainable) / MB,
                 "opt_state_MB": _nbytes(built.state.opt_state) / MB,
                 "arguments_MB": stats.argument_size_in_bytes / MB,
                 "outputs_MB": stats.output_size_in_bytes / MB,
                 "aliased_MB": stats.alias_size_in_bytes / MB,
                 "temp_MB": stats.temp_size_in_bytes / MB, "peak_MB": peak / MB})
    print(f"[{label}] {name}: peak {peak / MB:.1f} MB", flush=True)
  lora = rows[0]
  for r in rows:
    r["peak_vs_lora_%"] = 100 * (r["peak_MB"] / lora["peak_MB"] - 1)
    r["temp_vs_lora_MB"] = r["temp_MB"] - lora["temp_MB"]
    r["state_vs_lora_MB"] = (r["trainable_MB"] + r["opt_state_MB"]
                             - lora["trainable_MB"] - lora["opt_state_MB"])
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--bert-base", action="store_true",
                      help="also the random BERT-base-sized model at batch 8 x 128")
  args = parser.parse_args()
  base, params, config = _steps.load_minilm()
  rows = measure("minilm b32x128", base, params, config, 32, 128)
  if args.bert_base:
    base, params, config = _steps.load_bert_base()
    rows += measure("bert-base(random) b8x128", base, params, config, 8, 128)
  print(_common.table(rows, ["model", "method", "trainable_MB", "opt_state_MB", "arguments_MB",
                             "temp_MB", "aliased_MB", "peak_MB", "peak_vs_lora_%",
                             "temp_vs_lora_MB", "state_vs_lora_MB"]))
  path = _common.write_json("memory.json", {"args": vars(args), "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
