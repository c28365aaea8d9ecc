"""A tiny training run used by test_checkpoint.py: train, checkpoint, optionally die.

python resume_script.py DIR TOTAL_STEPS [--die-after K] [--method NAME]

Trains a small wrapped MLP for TOTAL_STEPS optimizer steps (resuming from DIR when it holds a
checkpoint), saves a checkpoint after every step, and with --die-after K kills itself with
os._exit right after saving step K. At the end it writes the final state to DIR/final.npz.
"""

import argparse
import os
import sys

import jax
import numpy as np
from flax import traverse_util

import jaxrank

sys.path.insert(0, os.path.dirname(__file__))
import method_configs  # noqa: E402
import toy_training  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("directory")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--die-after", type=int, default=None)
  parser.add_argument("--method", default="lora")
  args = parser.parse_args()

  config = method_configs.CONFIGS[args.method](args.total_steps)
  model, frozen, state, (x_all, y_all) = toy_training.setup(config, args.total_steps)
  step_fn = jax.jit(toy_training.make_step(config, model))
  train_step = lambda state, x, y: step_fn(state, frozen, x, y)

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
  as_numpy = lambda l: np.asarray(jax.random.key_data(l) if jax.dtypes.issubdtype(
      l.dtype, jax.dtypes.prng_key) else l)
  flat.update({f"opt/{i}": as_numpy(l) for i, l in enumerate(jax.tree.leaves(state["opt_state"]))})
  flat["rng"] = np.asarray(jax.random.key_data(state["rng"]))
  pattern = jaxrank.rank_pattern(model, final)
  flat.update({f"rank/{k}": np.asarray(v) for k, v in pattern.items()})
  np.savez(os.path.join(args.directory, "final.npz"), **flat)


if __name__ == "__main__":
  main()
