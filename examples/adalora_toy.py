"""AdaLoRA on a planted-rank toy task: where does the global rank budget go?

The base model is a frozen random network of three Dense layers that read separate slices of
the input (so what each layer must learn is identifiable). The teacher is the same network with
low-rank updates of known rank added to its kernels: rank 4 on ``l1``, none on ``l2``, rank 2 on
``l3``. The student wraps the base with AdaLoRA adapters of ``init_r=6`` on every layer and is
trained on random inputs to match the teacher (MSE + the orthogonality penalty). The budget
shrinks from 3 × 6 = 18 triplets to ``target_r × 3 = 6``, the total planted rank.

Run: ``python examples/adalora_toy.py`` (about half a minute on two CPU cores).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrank
from jaxrank import AdaLoRA, adalora, adalora_rank_pattern as rank_pattern_from_state

WIDTH = 16
PLANTED = {"l1": 4, "l2": 0, "l3": 2}
INIT_R, TARGET_R = 6, 2
TOTAL_STEP, TINIT, TFINAL, DELTA_T = 600, 100, 150, 10


class Blocks(nn.Module):
  """``y = tanh([l1(x_1), l2(x_2), l3(x_3)])`` for the three slices ``x_k`` of the input."""

  @nn.compact
  def __call__(self, x):
    slices = jnp.split(x, len(PLANTED), axis=-1)
    outs = [nn.Dense(WIDTH, name=name)(xs) for name, xs in zip(PLANTED, slices)]
    return nn.tanh(jnp.concatenate(outs, axis=-1))


def planted_teacher(params, key):
  """The base parameters with a rank-``PLANTED[name]`` update added to each kernel."""
  teacher = jax.tree.map(lambda x: x, params)
  for name, rank in PLANTED.items():
    if rank == 0:
      continue
    key, ku, kv = jax.random.split(key, 3)
    fan_in, fan_out = params[name]["kernel"].shape
    u = jax.random.normal(ku, (fan_in, rank)) / np.sqrt(fan_in)
    v = jax.random.normal(kv, (rank, fan_out))
    teacher[name]["kernel"] = params[name]["kernel"] + u @ v
  return teacher


def main(seed: int = 0, log_every: int = 100):
  key = jax.random.key(seed)
  base = Blocks()
  model = jaxrank.wrap(base, adapter=AdaLoRA(rank=INIT_R, alpha=float(INIT_R)))
  variables = model.init(key, jnp.ones((1, len(PLANTED) * WIDTH)))
  frozen, trainable = jaxrank.split_variables(variables)
  teacher = planted_teacher(frozen["params"], jax.random.key(seed + 1))

  tx = adalora(optax.adam(1e-2), init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL,
               total_step=TOTAL_STEP, deltaT=DELTA_T)
  opt_state = tx.init(trainable)

  def loss_fn(trainable, x):
    target = base.apply({"params": teacher}, x)
    student_vars = {**frozen, **trainable}
    mse = jnp.mean((model.apply(student_vars, x) - target) ** 2)
    return mse + 0.1 * jaxrank.orthogonality_penalty(model, student_vars), mse

  @jax.jit
  def train_step(trainable, opt_state, key):
    x = jax.random.normal(key, (64, len(PLANTED) * WIDTH))
    (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, x)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, mse

  data_key = jax.random.key(seed + 2)
  for step in range(TOTAL_STEP):
    trainable, opt_state, mse = train_step(trainable, opt_state, jax.random.fold_in(data_key, step))
    if step % log_every == 0 or step == TOTAL_STEP - 1:
      pattern = {k: int(v.sum()) for k, v in rank_pattern_from_state(opt_state).items()}
      budget = int(jaxrank.find_adalora_state(opt_state).budget)
      print(f"step {step:4d}  mse {float(mse):.5f}  budget {budget:2d}  ranks {pattern}")

  pattern = {k: int(v.sum()) for k, v in rank_pattern_from_state(opt_state).items()}
  print("planted ranks:", PLANTED)
  print("learned ranks:", pattern)
  print("ranks counted from the singular values:", jaxrank.rank_pattern(model, {**frozen, **trainable}))
  print(f"train step compiled {train_step._cache_size()} time(s)")
  return pattern, float(mse)


if __name__ == "__main__":
  main()
