"""The train step of each method on a BERT classifier, built as ``jaxrank.train.fit`` builds it.

``build(name, hf_module, params, batch, ...)`` returns a :class:`Built`: the jitted step (the
same objective and update as ``fit``'s ``train_step``: task loss + the method's penalty, the
method's optax transform on ``lora``/``gates`` and AdamW on the head, dropout rngs and the
method's extra rng streams), its frozen variables and a fresh state. The methods come from
``jaxrank.cli.build_method`` (what ``jaxrank finetune --method NAME`` trains); plain LoRA is
``jaxrank.train.lora_method(rank)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _variables
from jaxrank import cli
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
    return train.lora_method(rank=rank)
  options = cli.MethodOptions(rank=rank, budget_rank=budget_rank)
  return cli.build_method(name, options, steps)


def build(name: str, base, params, batch, *, rank: int = 8, budget_rank: int = 4,
          steps: int = 1000, dropout: bool = True, targets=QV, learning_rate: float = 1e-4,
          seed: int = 0, method=None, donate: bool = True) -> Built:
  """Everything ``fit`` sets up before its loop, for method ``name`` (or ``method``)."""
  method = method or method_for(name, rank=rank, budget_rank=budget_rank, steps=steps)
  task = bert.classification_task()
  model = train._wrap_model(base, method, targets)
  key_init, key_train = jax.random.split(jax.random.key(seed))
  init_vars = train._init_adapters(model, task, batch, key_init)
  full = {**train._plain(init_vars), "params": train._plain(params)}
  if method.prepare is not None:
    full = method.prepare(model, full)
  body, head_params = train.split_head(full["params"], bert.HEAD_MODULES)
  frozen = {**{k: v for k, v in full.items() if k not in _variables.TRAINABLE_COLLECTIONS},
            "params": body}
  trainable = {k: v for k, v in full.items() if k in _variables.TRAINABLE_COLLECTIONS}
  trainable[train.HEAD] = head_params
  schedule = train.warmup_linear_schedule(learning_rate, steps)

  def loss_fn(trainable_, b):
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    leaves = jax.tree.leaves(trainable_.get(train.HEAD), is_leaf=is_masked)
    if not leaves or any(is_masked(x) for x in leaves):
      trainable_ = {**trainable_, train.HEAD: head_params}
    out = task.apply(model, train.join(frozen, trainable_), b, deterministic=True)
    return task.loss(out, b)

  # ALoRA scores on the first 8 rows of a validation batch (cli's alora_scoring_examples)
  ctx = train.MethodContext(model=model, total_steps=steps, learning_rate=learning_rate,
                            schedule=schedule, loss_fn=loss_fn, validation_batch=batch,
                            num_matrices=len(_variables.adapter_layers(model, full)))
  tx = method.optimizer(ctx)
  if method.separate_head:
    tx = train.with_head(tx, optax.adamw(schedule, weight_decay=0.0))
  trainable = copy_tree(trainable)  # the step donates its state: never alias the caller's params
  state = train.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), key_train)

  def step_fn(frozen, state, b):
    rng, step_rng = jax.random.split(state.rng)
    names = tuple(dict.fromkeys(("dropout",) + tuple(method.train_rngs)))
    rngs = dict(zip(names, jax.random.split(step_rng, len(names))))

    def objective(trainable):
      full_vars = train.join(frozen, trainable)
      out = task.apply(model, full_vars, b, rngs=rngs, deterministic=not dropout)
      task_loss = task.loss(out, b)
      extra = method.penalty(model, full_vars) if method.penalty is not None else 0.0
      return task_loss + extra, task_loss

    (_, task_loss), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return train.TrainState(state.step + 1, trainable, opt_state, rng), task_loss

  def transform(grads, opt_state, trainable):
    return tx.update(grads, opt_state, trainable)

  step = jax.jit(step_fn, donate_argnums=(1,) if donate else ())
  return Built(name, model, method, tx, frozen, state, step, step_fn, transform)


def copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def load_minilm():
  hf, _ = bert.load_minilm(num_labels=2, seed=0)
  return hf.module, {"params": hf.params}["params"], hf.config


def load_bert_base(seed: int = 0):
  """A BERT-base-sized classifier with random weights (hidden 768, 12 layers, 12 heads)."""
  import transformers
  config = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                   num_attention_heads=12, intermediate_size=3072,
                                   num_labels=2)
  hf = transformers.FlaxBertForSequenceClassification(config, seed=seed, _do_init=True)
  return hf.module, hf.params, config
