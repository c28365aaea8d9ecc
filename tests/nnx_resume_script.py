"""A tiny NNX run for test_nnx_resume.py: restore a checkpoint in a fresh process, finish it.

python nnx_resume_script.py DIR TOTAL_STEPS METHOD [METHOD ...]

For each method, builds the model and its training anew (``jaxrank.nnx.setup``), restores
``DIR/METHOD`` (written by the test after TOTAL_STEPS // 2 steps), trains to TOTAL_STEPS and
writes the trainable state, the optimizer state and the key to ``DIR/METHOD.npz``.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxrank
from jaxrank import tasks

FEATURES, BATCH = 6, 8


class Net(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(FEATURES, 16, rngs=rngs)
    self.mid = nnx.Linear(16, 16, rngs=rngs)
    self.classifier = nnx.Linear(16, 3, rngs=rngs)  # the head: "all-linear" leaves it out

  def __call__(self, x):
    return self.classifier(jnp.tanh(self.mid(jnp.tanh(self.body(x)))))


def data():
  x = np.random.default_rng(0).normal(size=(96, FEATURES)).astype(np.float32)
  labels = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
  return {"x": x, "labels": labels}


def batch(step: int):
  rows = (np.arange(BATCH) + step * BATCH) % 96
  return {k: v[rows] for k, v in data().items()}


def build(method: str, steps: int):
  """A fresh adapted model and its training (the same in every process)."""
  options = dict(rank=4, budget_rank=2, total_steps=steps)
  if method == "alora":
    options.update(scoring_examples=BATCH, chunk_size=1)
  if method == "lora":
    options = dict(rank=2)
  task = tasks.classification_task(lambda model, b: model(b["x"]))
  model = Net(nnx.Rngs(0))
  training = jaxrank.nnx.setup(model, jaxrank.recipe(method, **options), task, steps=steps,
                               learning_rate=3e-2, validation_batch=batch(1000))
  return model, training


def train(model, training, key, first: int, last: int):
  """Steps ``first+1 .. last``; returns the key after them."""
  for step in range(first, last):
    key, step_key = jax.random.split(key)
    training.train_step(model, training.optimizer, batch(step), step_key)
  return key


def snapshot(model, optimizer, key) -> dict:
  """Every trainable leaf, every optimizer-state leaf and the key, as flat numpy arrays."""
  def flat(prefix, tree):
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(tree))
    return {prefix + jax.tree_util.keystr(p): np.asarray(
        jax.random.key_data(v) if jax.dtypes.issubdtype(jnp.asarray(v).dtype,
                                                        jax.dtypes.prng_key) else v)
            for p, v in leaves}
  out = {**flat("trainable", nnx.state(model, jaxrank.nnx.TRAINABLE)),
         **flat("optimizer", nnx.state(optimizer))}
  out["key"] = np.asarray(jax.random.key_data(key))
  return out


def main():
  directory, total = sys.argv[1], int(sys.argv[2])
  for method in sys.argv[3:]:
    model, training = build(method, total)
    key = jaxrank.nnx.restore_checkpoint(os.path.join(directory, method), model,
                                         training.optimizer, key=training.key)
    assert int(training.optimizer.step[...]) == total // 2
    key = train(model, training, key, total // 2, total)
    np.savez(os.path.join(directory, f"{method}.npz"), **snapshot(model, training.optimizer, key))


if __name__ == "__main__":
  main()
