"""The train step of each method on a BERT classifier, built as ``jaxrank.train.fit`` builds it.

``build(name, hf_module, params, batch, ...)`` returns a :class:`Built`: ``fit``'s own set-up
(``jaxrank.train.setup``) and step (``jaxrank.train.make_train_step``: task loss + the method's
penalty, the method's optax transform on ``lora``/``gates`` and AdamW on the head, dropout rngs
and the method's extra rng streams), jitted with the state donated, its frozen variables and a
fresh state. The methods come from
``jaxrank.recipes.recipe`` (what ``jaxrank finetune --method NAME`` trains); plain LoRA is
``jaxrank.recipes.lora_recipe(rank=rank)``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from jaxrank import recipes
from jaxrank import sharding
from jaxrank import train
from jaxrank.models import bert

QV = ("query", "value")
METHODS = ("lora", "sora", "adalora", "salora", "alora")


@dataclasses.dataclass
class Built:
  name: str
  model: Any
  method: Any
  tx: Any
  frozen: dict
  state: train.TrainState
  step: Callable  # jitted (frozen, state, batch) -> (state, loss), state donated
  step_fn: Callable  # the same, not jitted
  transform: Callable  # (grads, opt_state, trainable) -> (updates, opt_state), not jitted


def random_batch(batch_size: int, seq_len: int, vocab: int, num_labels: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, size=(batch_size, seq_len)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "token_type_ids": np.zeros_like(ids),
          "labels": rng.integers(0, num_labels, size=batch_size).astype(np.int32)}


def method_for(name: str, *, rank: int, budget_rank: int, steps: int):
  if name == "lora":
    return recipes.lora_recipe(rank=rank)
  return recipes.recipe(name, rank=rank, budget_rank=budget_rank, total_steps=steps)


def build(name: str, base, params, batch, *, rank: int = 8, budget_rank: int = 4,
          steps: int = 1000, dropout: bool = True, targets=QV, learning_rate: float = 1e-4,
          seed: int = 0, method=None, donate: bool = True, mesh=None) -> Built:
  """Everything ``fit`` sets up before its loop, for method ``name`` (or ``method``); with
  ``mesh``, as ``fit(..., mesh=mesh)`` (variables replicated; place batches with
  :func:`place_batch`)."""
  method = method or method_for(name, rank=rank, budget_rank=budget_rank, steps=steps)
  task = bert.classification_task()
  # ALoRA scores on the first 8 rows of a validation batch (alora_recipe's scoring_examples)
  prepared = train.setup(base, {"params": params}, method, task, first_batch=batch,
                         steps=steps, learning_rate=learning_rate, head=bert.HEAD_MODULES,
                         targets=targets, seed=seed, validation_batch=batch, mesh=mesh)
  step_fn = train.make_train_step(prepared.model, method, task, prepared.tx,
                                  deterministic=not dropout)

  def transform(grads, opt_state, trainable):
    return prepared.tx.update(grads, opt_state, trainable)

  step = train.jit_train_step(step_fn, mesh, donate=donate)
  return Built(name, prepared.model, method, prepared.tx, prepared.frozen, prepared.state, step,
               step_fn, transform)


def add_cpu_devices_option(parser, default: int = 0):
  """``--cpu-devices``: how many XLA CPU devices the data-parallel run uses (0: one per core).
  Pass ``args.cpu_devices`` to :func:`split_cpu` before any JAX work."""
  parser.add_argument("--cpu-devices", type=int, default=default,
                      help="XLA CPU devices of the data-parallel run (0: one per core)")


def split_cpu(devices: int) -> int:
  """Splits the CPU into ``devices`` XLA devices (0: one per core); call before any JAX work.

  A computation placed on one of them still uses every core for its matmuls; a data-parallel
  step over all of them also runs the batched matmuls (attention) on every core.
  """
  devices = devices or os.cpu_count() or 1
  jax.config.update("jax_num_cpu_devices", devices)
  return devices


def data_mesh(devices: int):
  """An Auto ``('data',)`` mesh over the first ``devices`` devices, or None for one device."""
  if devices == 1:
    return None
  return sharding.data_parallel_mesh(jax.devices()[:devices])


def place_batch(batch, mesh):
  """``batch`` split over ``mesh``'s ``data`` axis as ``fit`` splits it (unchanged without)."""
  return train.batch_placement(mesh, "data", batch_size=len(batch["input_ids"]))(batch)


def compile_step(built: Built, batch) -> tuple[Callable, float]:
  """``built.step`` compiled ahead for ``batch``, and the seconds that took."""
  start = time.perf_counter()
  compiled = built.step.lower(built.frozen, built.state, batch).compile()
  return compiled, time.perf_counter() - start


def timed_step(step: Callable, frozen, state, batch) -> tuple[float, train.TrainState]:
  """``(seconds, new_state)`` of one step from ``state`` (donated), waited for."""
  start = time.perf_counter()
  state, loss = step(frozen, state, batch)
  jax.block_until_ready(loss)
  return time.perf_counter() - start, state


def time_steps(step: Callable, built: Built, batch, *, warmup: int,
               repeats: int) -> tuple[float, list, train.TrainState]:
  """``(median_s, times_s, final_state)`` of ``repeats`` steps after ``warmup`` from
  ``built.state``."""
  holder = {"state": built.state}

  def one():
    _, holder["state"] = timed_step(step, built.frozen, holder["state"], batch)

  median, times = _common.median_time(one, warmup=warmup, repeats=repeats)
  return median, times, holder["state"]


def copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def load_minilm():
  model, _ = bert.load_minilm(num_labels=2, seed=0)
  return model.module, model.params, model.config


def load_bert_base(seed: int = 0):
  """A BERT-base-sized classifier with random weights (hidden 768, 12 layers, 12 heads)."""
  import transformers
  config = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                   num_attention_heads=12, intermediate_size=3072,
                                   num_labels=2)
  hf = transformers.FlaxBertForSequenceClassification(config, seed=seed, _do_init=True)
  return hf.module, hf.params, config
