"""BBC News test accuracy of a demo run's exports, computed in PyTorch (issue 18).

    python benchmarks/demo_in_pytorch.py RUN_DIR [--merged HF_DIR]

``RUN_DIR`` is one method's folder of ``jaxrank demo`` (e.g. ``runs/lora``): its
``adapter/peft`` is loaded with ``peft.PeftModel.from_pretrained`` onto PyTorch MiniLM, and
``--merged`` (the output of ``jaxrank export RUN_DIR --model minilm --format hf``) with
``AutoModelForSequenceClassification.from_pretrained``. Prints a table next to jaxrank's own
test accuracy from ``RUN_DIR/metrics.json`` and writes ``results/demo_in_pytorch.json``.
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers

from jaxrank.data import bbc_news
from jaxrank.models import bert

MAX_LENGTH = 64  # the demo's


def _accuracy(model, data, batch=64):
  predictions = []
  with torch.no_grad():
    for i in range(0, len(data["labels"]), batch):
      inputs = {k: torch.tensor(data[k][i:i + batch])
                for k in ("input_ids", "attention_mask", "token_type_ids")}
      predictions.append(model(**inputs).logits.argmax(-1).numpy())
  predictions = np.concatenate(predictions)
  return float((predictions == data["labels"]).mean()), int((predictions == data["labels"]).sum())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("run_dir")
  parser.add_argument("--merged", default=None)
  args = parser.parse_args()
  import peft

  splits = bbc_news.load_bbc_news()
  data = bert.tokenize_classification(bert.minilm_tokenizer(), splits["test"], MAX_LENGTH)
  base = transformers.BertForSequenceClassification.from_pretrained(
      bert.minilm_path(), num_labels=splits["train"].num_labels).eval()
  rows = {"peft adapter": _accuracy(
      peft.PeftModel.from_pretrained(base, os.path.join(args.run_dir, "adapter", "peft")).eval(),
      data)}
  if args.merged:
    rows["merged checkpoint"] = _accuracy(
        transformers.AutoModelForSequenceClassification.from_pretrained(args.merged).eval(), data)
  with open(os.path.join(args.run_dir, "metrics.json")) as f:
    reported = json.load(f)["final_metrics"]["test_accuracy"]
  print(f"{'export':18} | pytorch test acc | correct / {len(data['labels'])} | jaxrank table")
  for name, (accuracy, correct) in rows.items():
    print(f"{name:18} | {accuracy:.6f}         | {correct:<13} | {reported:.6f}")
  out = os.path.join(os.path.dirname(__file__), "results", "demo_in_pytorch.json")
  with open(out, "w") as f:
    json.dump({"run_dir": args.run_dir, "jaxrank_test_accuracy": reported,
               "n": int(len(data["labels"])),
               **{name: {"accuracy": a, "correct": c} for name, (a, c) in rows.items()}}, f,
              indent=1)


if __name__ == "__main__":
  main()
