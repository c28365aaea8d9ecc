"""Quickstart: LoRA on a Flax MLP with optax, recovering a planted low-rank update.

A frozen random MLP is the "pretrained" model. The teacher is the same MLP whose hidden layer
kernel got a rank-2 update. We wrap the MLP with rank-8 LoRA adapters on every linear layer,
train only the adapters with AdamW to match the teacher, then merge the adapters into plain
kernels and print what the adapters learned: the loss, and the singular values of each learned
update ΔW (the hidden layer's should show two large values, the output layer's none).

Run: python examples/quickstart.py
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrank

IN, HIDDEN, OUT = 32, 64, 16


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(HIDDEN, name="hidden")(x))
    return nn.Dense(OUT, name="out")(x)


def main(steps: int = 1500, seed: int = 0):
  start = time.perf_counter()
  base = MLP()
  keys = jax.random.split(jax.random.key(seed), 4)
  params = base.init(keys[0], jnp.ones((1, IN)))["params"]

  # Teacher: the base model plus a planted rank-2 update on the hidden layer.
  u = jax.random.normal(keys[1], (IN, 2)) / np.sqrt(IN)
  v = jax.random.normal(keys[2], (2, HIDDEN))
  teacher = jax.tree.map(lambda x: x, params)
  teacher["hidden"]["kernel"] = params["hidden"]["kernel"] + u @ v

  model = jaxrank.wrap(base, targets="all-linear", adapter=jaxrank.LoRA(rank=8, alpha=8))
  variables = model.init(keys[3], jnp.ones((1, IN)))
  variables["params"] = params  # the "pretrained" weights
  frozen, trainable = jaxrank.split_variables(variables)

  tx = optax.adamw(3e-3, weight_decay=0.0)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, x):
    def loss_fn(t):
      prediction = model.apply(jaxrank.join_variables(frozen, t), x)
      target = base.apply({"params": teacher}, x)
      return jnp.mean((prediction - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  data_key = jax.random.key(seed + 1)
  for i in range(steps):
    x = jax.random.normal(jax.random.fold_in(data_key, i), (128, IN))
    trainable, opt_state, loss = step(trainable, opt_state, x)
    if i == 0:
      first_loss = float(loss)
  variables = jaxrank.join_variables(frozen, trainable)

  merged = jaxrank.merge(model, variables)
  x = jax.random.normal(jax.random.key(99), (512, IN))
  target = base.apply({"params": teacher}, x)
  merged_loss = float(jnp.mean((base.apply({"params": merged}, x) - target) ** 2))
  frozen_loss = float(jnp.mean((base.apply({"params": params}, x) - target) ** 2))

  print(f"trainable adapter parameters: {jaxrank.trainable_parameter_count(variables)}"
        f" (base model: {jaxrank.count_parameters(variables)['params']})")
  print(f"train loss: first step {first_loss:.4f} -> last step {float(loss):.5f}")
  print(f"held-out loss: frozen base {frozen_loss:.4f}, merged LoRA model {merged_loss:.6f}")
  for name in ("hidden", "out"):
    delta = np.asarray(merged[name]["kernel"] - params[name]["kernel"])
    singular = np.linalg.svd(delta, compute_uv=False)
    print(f"learned update of {name!r}: top singular values "
          + ", ".join(f"{s:.3f}" for s in singular[:4]))
  truth = np.linalg.svd(np.asarray(u @ v), compute_uv=False)[:2]
  print("planted update of 'hidden': singular values " + ", ".join(f"{s:.3f}" for s in truth))
  print(f"wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
