"""ALoRA on a planted-rank toy task: ranks move to the layers that need them.

A frozen random 3-layer ReLU MLP is the base. The teacher is the same MLP with a rank-3
update added to layers ``l0`` and ``l2`` and none to ``l1``. The student starts every layer
at rank 2 (capacity 6, budget 6), trains K1 steps with the ALoRA transform, then runs N_A
rounds of AB-LoRA scoring (eq. 6) -> prune 1 rank -> give it to a layer that lost none,
K2 recovery steps each. Everything runs inside one jitted train step.

Run:  python examples/alora_toy.py
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrank
from jaxrank import ALoRA, alora, live_rank_total

PLANTED = {"l0": 3, "l1": 0, "l2": 3}
K1, K2, N_A, N_PRUNE = 300, 100, 4, 1
TOTAL = K1 + N_A * K2 + 100


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(12, name="l0")(x))
    x = nn.relu(nn.Dense(12, name="l1")(x))
    return nn.Dense(6, name="l2")(x)


def main():
  spec = ALoRA(rank=6, initial_rank=2, alpha=2.0)
  model = jaxrank.wrap(MLP(), adapter=spec)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8)))

  teacher = jax.tree.map(lambda a: a, variables["params"])
  key = jax.random.key(1)
  for name, rank in PLANTED.items():
    if rank:
      key, k1, k2 = jax.random.split(key, 3)
      kernel = teacher[name]["kernel"]
      u = jax.random.normal(k1, (kernel.shape[0], rank))
      v = jax.random.normal(k2, (rank, kernel.shape[1]))
      teacher[name]["kernel"] = kernel + u @ v / np.sqrt(kernel.shape[0])
  target = lambda x: MLP().apply({"params": teacher}, x)

  frozen, trainable = jaxrank.split_variables(variables)

  def loss_fn(t, batch):
    x, y = batch
    return jnp.mean((model.apply({**frozen, **t}, x) - y) ** 2)

  x_val = jax.random.normal(jax.random.key(7), (64, 8))
  validation = (x_val, target(x_val))
  tx = alora(optax.adam(1e-2), model, loss_fn, warmup_steps=K1, recovery_steps=K2,
                   num_rounds=N_A, ranks_per_round=N_PRUNE, total_steps=TOTAL,
                   validation_batch=validation)
  state = tx.init(trainable)

  @jax.jit
  def step(t, state, key):
    x = jax.random.normal(key, (64, 8))
    loss, grads = jax.value_and_grad(loss_fn)(t, (x, target(x)))
    updates, state = tx.update(grads, state, t)
    return optax.apply_updates(t, updates), state, loss

  print(f"planted ranks: {PLANTED}; start: {jaxrank.rank_pattern(spec, trainable)} "
        f"(budget {live_rank_total(spec, trainable)}, capacity {spec.rank})")
  start = time.time()
  rounds_seen = 0
  for i in range(TOTAL):
    before = trainable
    trainable, state, loss = step(trainable, state, jax.random.key(100 + i))
    if int(state.rounds_done) > rounds_seen:
      rounds_seen = int(state.rounds_done)
      pre = float(loss_fn(before, validation))  # before this step (and its round)
      post = float(loss_fn(trainable, validation))
      scores = {p: " ".join("  dead" if np.isnan(v) else f"{v:6.3f}" for v in np.asarray(s))
                for p, s in state.last_scores.items()}
      print(f"step {i + 1:4d} round {rounds_seen}: val loss {pre:.4f} -> {post:.4f} after "
            f"prune+add, ranks {jaxrank.rank_pattern(spec, trainable)}, "
            f"total {live_rank_total(spec, trainable)}")
      for path, line in scores.items():
        print(f"    IS (eq. 6) {path}: {line}")
  print(f"final: val loss {float(loss_fn(trainable, validation)):.5f}, ranks "
        f"{jaxrank.rank_pattern(spec, trainable)}, {time.time() - start:.1f}s")
  _, compacted, pattern = jaxrank.compact(model, {**frozen, **trainable})
  print(f"compact plain-LoRA export ranks: {pattern}")


if __name__ == "__main__":
  main()
