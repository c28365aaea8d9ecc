"""A tiny training run used by test_checkpoint.py: train, checkpoint, optionally die.

python resume_script.py DIR TOTAL_STEPS [--die-after K] [--method NAME]

Trains a small wrapped MLP for TOTAL_STEPS optimizer steps (resuming from DIR when it holds a
checkpoint), saves a checkpoint after every step, and with --die-after K kills itself with
os._exit right after saving step K. At the end it writes the final state to DIR/final.npz.
"""

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import jaxrank

sys.path.insert(0, os.path.dirname(__file__))
import method_configs  # noqa: E402


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("directory")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--die-after", type=int, default=None)
  parser.add_argument("--method", default="lora")
  args = parser.parse_args()

  config = method_configs.CONFIGS[args.method](args.total_steps)
  model = jaxrank.wrap(MLP(), adapter=config.adapter)
  x_all = jax.random.normal(jax.random.key(1), (args.total_steps, 16, 6))
  y_all = jnp.sin(x_all[..., :4] * 2.0)
  variables = model.init(jax.random.key(0), x_all[0])
  frozen, trainable = jaxrank.split_variables(variables)
  tx = config.optimizer
  state = {"step": jnp.array(0, jnp.int32), "trainable": trainable,
           "opt_state": tx.init(trainable), "rng": jax.random.key(42)}

  @jax.jit
  def train_step(state, x, y):
    rng, dropout_rng = jax.random.split(state["rng"])

    def loss_fn(trainable):
      v = jaxrank.join_variables(frozen, trainable)
      out = model.apply(v, x, rngs={"dropout": dropout_rng, "hard_concrete": dropout_rng})
      return jnp.mean((out - y) ** 2) + config.penalty(model, v)

    grads = jax.grad(loss_fn)(state["trainable"])
    updates, opt_state = tx.update(
        grads, state["opt_state"], state["trainable"],
        **config.extra_args(model, frozen, x, y))
    return {"step": state["step"] + 1, "trainable": optax.apply_updates(state["trainable"], updates),
            "opt_state": opt_state, "rng": rng}

  if jaxrank.checkpoint.latest_step(args.directory) is not None:
    state = jaxrank.checkpoint.restore(args.directory, state)
  while int(state["step"]) < args.total_steps:
    step = int(state["step"])
    state = train_step(state, x_all[step], y_all[step])
    jaxrank.checkpoint.save(args.directory, int(state["step"]), state)
    if args.die_after is not None and int(state["step"]) == args.die_after:
      os._exit(17)

  final = jaxrank.join_variables(frozen, state["trainable"])
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(final).items()}
  flat.update({f"opt/{i}": np.asarray(l) for i, l in enumerate(jax.tree.leaves(state["opt_state"]))})
  flat["rng"] = np.asarray(jax.random.key_data(state["rng"]))
  pattern = jaxrank.rank_pattern(model, final)
  flat.update({f"rank/{k}": np.asarray(v) for k, v in pattern.items()})
  np.savez(os.path.join(args.directory, "final.npz"), **flat)


if __name__ == "__main__":
  main()
