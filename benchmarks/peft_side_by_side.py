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

Run:  python benchmarks/peft_side_by_side.py [--repeats 10] [--cpu-devices 0]
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from benchmarks import _steps
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  _steps.add_cpu_devices_option(parser)
  args = parser.parse_args()
  devices = _steps.split_cpu(args.cpu_devices)  # before any JAX work
  threads = os.cpu_count() or 1
  import torch
  torch.set_num_threads(threads)

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
