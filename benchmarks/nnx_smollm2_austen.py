"""Every method on SmolLM2-135M as a Flax NNX model, fine-tuned on Austen: held-out perplexity.

For each method a fresh :class:`jaxrank.models.llama_nnx.LlamaForCausalLM` is built from the
same dequantized weights (RoPE base = the GGUF's ``rope_theta``, 100000), adapted on
``q_proj``/``v_proj`` and trained by :func:`jaxrank.nnx.fit`. The validation split drives
``fit``'s before/after evaluation (and ALoRA's scoring batch); the reported number is the
perplexity on the first ``--test-examples`` windows of the *test* split, which no method sees,
against the frozen model's on the same windows.

  nice -n 10 python benchmarks/nnx_smollm2_austen.py            # the README's table
  python benchmarks/nnx_smollm2_austen.py --steps 20 --methods lora,sora   # a quick look

Writes ``benchmarks/results/nnx_smollm2_austen.json`` after every method.
"""

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="lora,sora,adalora,salora,alora,svd")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--max-length", type=int, default=32)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--budget-rank", type=int, default=2)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--train-examples", type=int, default=4096)
  parser.add_argument("--eval-examples", type=int, default=32)
  parser.add_argument("--test-examples", type=int, default=64)
  parser.add_argument("--alora-rounds", type=int, default=2)
  parser.add_argument("--alora-scoring-examples", type=int, default=4)
  parser.add_argument("--output", default=os.path.join(_common.RESULTS,
                                                       "nnx_smollm2_austen.json"))
  args = parser.parse_args()

  import jaxrank
  from jaxrank import _nnx_train
  from jaxrank.data import austen
  from jaxrank.models import llama
  from jaxrank.models import llama_nnx

  config_dict, tensors, reader = llama.read_gguf()
  params = llama.gguf_to_flax_params(config_dict, tensors)
  config = llama_nnx.LlamaConfig.from_dict(config_dict)
  splits = austen.load_austen_chunks(llama.gguf_tokenizer(reader), max_length=args.max_length)
  first = lambda split, n: {k: v[:n] for k, v in splits[split].items()}
  train, validation = first("train", args.train_examples), first("validation", args.eval_examples)
  test = first("test", args.test_examples)
  task = llama_nnx.causal_lm_task()

  frozen = _nnx_train.evaluate(llama_nnx.from_flax_params(config, params), task, test,
                               args.batch_size)
  report = {"machine": _common.machine(), "args": vars(args), "rope_theta": config.rope_theta,
            "frozen_test": frozen, "methods": {}}
  print(f"frozen: test perplexity {frozen['perplexity']:.3f} (loss {frozen['loss']:.4f})",
        flush=True)
  for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
    options = dict(rank=args.rank, budget_rank=args.budget_rank, total_steps=args.steps)
    if method == "lora":
      options = dict(rank=args.budget_rank)  # the others' final budget, trained at full rank
    if method == "alora":
      options.update(rounds=args.alora_rounds, scoring_examples=args.alora_scoring_examples)
    model = llama_nnx.from_flax_params(config, params)
    result = jaxrank.nnx.fit(model, jaxrank.recipe(method, **options), task, train_data=train,
                             eval_data=validation, steps=args.steps, batch_size=args.batch_size,
                             learning_rate=args.lr, targets=["q_proj", "v_proj"], progress=False)
    after = _nnx_train.evaluate(result.model, task, test, args.batch_size)
    row = {"test": after, "validation_before": result.history[0],
           "validation_after": result.final_metrics, "total_rank": sum(result.rank_pattern.values()),
           "matrices": len(result.rank_pattern), "rank_pattern": result.rank_pattern,
           "first_loss": result.losses[0], "last_loss": result.losses[-1],
           "wall_time_s": result.wall_time,
           "below_frozen": bool(after["perplexity"] < frozen["perplexity"])}
    report["methods"][method] = row
    print(f"{method}: test perplexity {after['perplexity']:.3f} (frozen {frozen['perplexity']:.3f})"
          f", total rank {row['total_rank']} over {row['matrices']} matrices, "
          f"{result.wall_time:.0f} s", flush=True)
    with open(args.output, "w") as f:
      json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
  main()
