"""jaxrank vs PyTorch + PEFT: LoRA and AdaLoRA train-step time on MiniLM, dropout on and off.

Setup as in the reference baseline (shared/reference/env.md §4): all-MiniLM-L6-v2 as a
2-label sequence classifier, batch 32 × 128 random tokens, train mode, AdamW lr 1e-4 wd 0.01;
LoRA r = 8, alpha = 16 on query and value; AdaLoRA init_r = 12 → target_r = 8, tinit = tfinal = 0,
deltaT = 1 (allocation every step: the worst case), total_step = 1000, orthogonality weight 0.5
(PEFT's default; jaxrank uses its ``form="peft"`` penalty with the same weight). PEFT's step is
forward (+ AdaLoRA's regulariser) + backward + ``opt.step()`` + ``update_and_allocate`` +
``zero_grad``; torch runs one thread per core (``torch.set_num_threads``). jaxrank's step is
the one ``jaxrank.train.fit`` runs (benchmarks/_steps.py), jitted, state donated. "Dropout off"
sets the model's hidden and attention dropout to 0 (PyTorch) / ``deterministic=True`` (jaxrank).

jaxrank runs twice: on one XLA device, and data-parallel over ``--cpu-devices`` XLA devices that
split the same cores (default: one per core; ``fit(..., mesh=...)``, the CLI's ``--cpu-devices``):
XLA:CPU runs each batched matmul (attention's QKᵀ and PV) on a single core, so one device per
core is what lets attention use them all. Both use the same cores as PyTorch's threads.

For each configuration PyTorch runs its steps, then jaxrank runs its steps (not interleaved: the
two runtimes' thread pools would fight); the median of ``--repeats`` steps after ``--warmup``.

Real-length run (``--real-length``): the same variable-length texts on both sides, BBC News
first paragraphs (the first line after the headline) truncated at 64 tokens, 5 labels, LoRA
r = 8 on query and value, dropout on, the same batches of 32 in the same order. PyTorch pads
each batch to its longest text; jaxrank pads it to the smallest bucket of
``jaxrank.batching.bucket_lengths(64)`` = 16, 24, 32, 48, 64 that holds it (what ``jaxrank finetune
--train FILE`` does), and, for reference, every batch to 64. Every bucket shape is compiled
before timing; the time per step is the mean over the same batches.

Run:  python benchmarks/peft_side_by_side.py [--repeats 10] [--cpu-devices 0] [--real-length]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from benchmarks import _steps
from jaxrank import batching
from jaxrank import recipes
from jaxrank.models import bert

LR, WD, STEPS = 1e-4, 0.01, 1000


def torch_step_fn(method: str, dropout: bool, batch):
  import peft
  import torch
  import transformers
  torch.manual_seed(0)
  p = 0.1 if dropout else 0.0
  model = transformers.BertForSequenceClassification.from_pretrained(
      str(bert.minilm_path()), num_labels=2, hidden_dropout_prob=p,
      attention_probs_dropout_prob=p)
  if method == "lora":
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=["query", "value"], task_type="SEQ_CLS")
  else:
    config = peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.0,
                                target_modules=["query", "value"], task_type="SEQ_CLS",
                                tinit=0, tfinal=0, deltaT=1, total_step=STEPS)
  model = peft.get_peft_model(model, config)
  model.train()
  opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR,
                          weight_decay=WD)
  tb = {k: torch.as_tensor(v).long() for k, v in batch.items()}
  counter = {"step": 0}
  trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)

  def step():
    out = model(**tb)
    out.loss.backward()
    opt.step()
    if method == "adalora":
      model.base_model.update_and_allocate(counter["step"])
    opt.zero_grad(set_to_none=True)
    counter["step"] += 1

  return step, trainable


def jax_built(method: str, dropout: bool, base, params, batch, mesh):
  if method == "lora":
    m = recipes.lora_recipe(rank=8, alpha=16.0, weight_decay=WD)
    rank = 8
  else:
    # PEFT's AdaLoraConfig above: no warmup/final phase, masking every step, PEFT's
    # orthogonality form at weight 0.5, the common learning rate
    m = recipes.adalora_recipe(rank=12, budget_rank=8, total_steps=STEPS, alpha=16.0,
                               weight_decay=WD, orthogonality_weight=0.5,
                               orthogonality_form="peft", lr_factor=1.0, tinit=0, tfinal=0,
                               delta_t=1)
    rank = 12
  return _steps.build(method, base, params, batch, method=m, rank=rank, dropout=dropout,
                      steps=STEPS, learning_rate=LR, mesh=mesh)


def columns(devices: int) -> list:
  return ["method", "dropout", "peft_s", "jaxrank_1dev_s", f"jaxrank_{devices}dev_s",
          "jaxrank_1dev/peft", f"jaxrank_{devices}dev/peft"]


def first_paragraph_batches(count: int, batch_size: int = 32, max_length: int = 64):
  """``count`` batches of BBC News first paragraphs: ``(per-batch padded, padded to 64)``."""
  from jaxrank.data import bbc_news
  split = bbc_news.load_bbc_news()["train"]
  paragraphs = []
  for text in split.texts:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs.append(lines[1] if len(lines) > 1 else lines[0])
  tokenizer = bert.minilm_tokenizer(max_length)
  per_batch, fixed = [], []
  for i in range(count):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    labels = np.asarray(split.labels[rows], np.int32)
    per_batch.append({**bert.encode(tokenizer, paragraphs[rows], max_length), "labels": labels})
    fixed.append({**bert.encode(tokenizer, paragraphs[rows], max_length, pad_to=max_length),
                  "labels": labels})
  return per_batch, fixed


def torch_lora_steps(batches_np, num_labels: int = 5):
  """PEFT LoRA r=8 q,v, dropout on: a function running one train step on batch ``i``."""
  import peft
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification.from_pretrained(
      str(bert.minilm_path()), num_labels=num_labels)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
      task_type="SEQ_CLS"))
  model.train()
  opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR,
                          weight_decay=WD)
  tensors = [{k: torch.as_tensor(v).long() for k, v in b.items()} for b in batches_np]

  def step(i):
    model(**tensors[i]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return step


def mean_over_batches(step, count: int, warmup: int) -> tuple[float, list]:
  for i in range(warmup):
    step(i)
  times = []
  for i in range(count):
    start = time.perf_counter()
    step(i)
    times.append(time.perf_counter() - start)
  return float(np.mean(times)), times


def jax_lora_steps(base, params, batches_np, mesh, buckets):
  """jaxrank's step (fit's, dropout on) on batch ``i`` cut to ``buckets`` (None: as given);
  every distinct shape is compiled first."""
  batches_np = [batching.trim_to_bucket(b, buckets) for b in batches_np]
  placed = [_steps.place_batch(jax.tree.map(jnp.asarray, b), mesh) for b in batches_np]
  method = recipes.lora_recipe(rank=8, alpha=16.0, weight_decay=WD)
  built = _steps.build("lora", base, params, placed[0], method=method, rank=8, dropout=True,
                       steps=STEPS, learning_rate=LR, mesh=mesh)
  holder = {"state": built.state}
  shapes = {}
  for b in placed:  # compile every bucket shape before timing
    shape = b["input_ids"].shape
    if shape not in shapes:
      _, holder["state"] = _steps.timed_step(built.step, built.frozen, holder["state"], b)
      shapes[shape] = True

  def step(i):
    _, holder["state"] = _steps.timed_step(built.step, built.frozen, holder["state"], placed[i])

  return step, sorted(s[1] for s in shapes)


def real_length(args, devices: int):
  """The real-length run (module docstring): one row per jaxrank configuration."""
  count = args.repeats + args.warmup
  per_batch, fixed = first_paragraph_batches(count)
  lengths = [int(b["input_ids"].shape[1]) for b in per_batch]
  torch_mean, torch_times = mean_over_batches(torch_lora_steps(per_batch), args.repeats,
                                              args.warmup)
  hf = bert.load_minilm(num_labels=5, seed=0)[0]  # 5 labels, as on the PyTorch side
  base, params = hf.module, hf.params
  rows = []
  for count_devices in sorted({1, devices}):
    mesh = _steps.data_mesh(count_devices)
    for name, buckets, data in (("bucketed", batching.bucket_lengths(64), fixed),
                                ("fixed 64", None, fixed)):
      step, shapes = jax_lora_steps(base, params, data, mesh, buckets)
      jax_mean, jax_times = mean_over_batches(step, args.repeats, args.warmup)
      rows.append({"jaxrank": f"{name}, {count_devices} dev", "peft_per_batch_s": torch_mean,
                   "jaxrank_s": jax_mean, "jaxrank/peft": jax_mean / torch_mean,
                   "jaxrank_lengths": shapes, "jaxrank_times_s": jax_times,
                   "peft_times_s": torch_times})
      print(_common.table(rows[-1:], REAL_COLUMNS), flush=True)
  return {"batch_size": 32, "max_length": 64, "peft_batch_lengths": lengths,
          "mean_peft_batch_length": float(np.mean(lengths)), "rows": rows}


REAL_COLUMNS = ["jaxrank", "peft_per_batch_s", "jaxrank_s", "jaxrank/peft", "jaxrank_lengths"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--real-length", action="store_true",
                      help="run only the real-length comparison (module docstring)")
  _steps.add_cpu_devices_option(parser)
  args = parser.parse_args()
  devices = _steps.split_cpu(args.cpu_devices)  # before any JAX work
  threads = os.cpu_count() or 1
  import torch
  torch.set_num_threads(threads)
  if args.real_length:
    result = real_length(args, devices)
    print(_common.table(result["rows"], REAL_COLUMNS))
    print("mean PyTorch batch length", result["mean_peft_batch_length"])
    path = _common.write_json("peft_side_by_side_real_length.json",
                              {"args": vars(args), "cpu_devices": devices,
                               "torch_threads": threads, **result})
    print("wrote", path)
    return

  base, params, config = _steps.load_minilm()
  batch_np = _steps.random_batch(32, 128, config.vocab_size)
  rows = []
  for method in ("lora", "adalora"):
    for dropout in (True, False):
      step, torch_trainable = torch_step_fn(method, dropout, batch_np)
      torch_med, torch_times = _common.median_time(step, warmup=args.warmup,
                                                   repeats=args.repeats)
      row = {"method": method, "dropout": "on" if dropout else "off", "torch_threads": threads,
             "peft_s": torch_med, "peft_trainable": torch_trainable, "peft_times_s": torch_times}
      for count in (1, devices):
        mesh = _steps.data_mesh(count)
        batch = _steps.place_batch(jax.tree.map(jnp.asarray, batch_np), mesh)
        b = jax_built(method, dropout, base, params, batch, mesh)
        compiled, compile_s = _steps.compile_step(b, batch)
        jax_med, jax_times, state = _steps.time_steps(compiled, b, batch, warmup=args.warmup,
                                                      repeats=args.repeats)
        row[f"jaxrank_{count}dev_s"] = jax_med
        row[f"jaxrank_{count}dev/peft"] = jax_med / torch_med
        row[f"jaxrank_{count}dev_compile_s"] = compile_s
        row[f"jaxrank_{count}dev_times_s"] = jax_times
        row["jaxrank_trainable"] = int(sum(np.size(x) for x in jax.tree.leaves(state.trainable)))
        del b, compiled, state
      rows.append(row)
      print(_common.table([row], columns(devices)), flush=True)
      del step
  print(_common.table(rows, columns(devices) + ["peft_trainable", "jaxrank_trainable"]))
  path = _common.write_json("peft_side_by_side.json",
                            {"args": vars(args), "cpu_devices": devices, "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
