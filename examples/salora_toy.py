"""SaLoRA on a planted-rank toy task: hard-concrete rank gates under a density budget.

A frozen random 4-layer MLP (16 wide, tanh) is the "pretrained" model. The teacher is the same
MLP with planted low-rank updates of ranks (1, 4, 0, 3) on its four layers. We wrap every layer
with rank-8 SaLoRA adapters (32 gated ranks in all), and train

    task MSE + β Σ R_orth(B, A) + λ (C(Θ) - b)²                      (SaLoRA eq. 9, 11, 12)

with a target density b = 0.25 (keep a quarter of the adapter parameters): Adam on A, B and
log θ, projected gradient ascent on λ, and (log θ, λ) trained only between steps T_start and
T_end. Gates are sampled once per batch per layer (rng stream "hard_concrete"). At the end
the gates are hardened, the model is compacted into a plain LoRA, and we print the density
reached, the ranks per layer and the losses.

Run: python examples/salora_toy.py
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrank
import jaxrank

WIDTH, RANK, PLANTED = 16, 8, (1, 4, 0, 3)
TARGET_DENSITY = 0.25
STEPS, T_START, T_END = 1000, 100, 700


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(len(PLANTED) - 1):
      x = jnp.tanh(nn.Dense(WIDTH, name=f"dense{i}")(x))
    return nn.Dense(WIDTH, name=f"dense{len(PLANTED) - 1}")(x)


def main(seed: int = 0):
  start = time.perf_counter()
  base = MLP()
  params = base.init(jax.random.key(seed), jnp.ones((1, WIDTH)))["params"]
  rng = np.random.default_rng(seed)
  teacher = jax.tree.map(lambda x: x, params)
  for i, r in enumerate(PLANTED):
    if r:
      delta = rng.normal(size=(WIDTH, r)) @ rng.normal(size=(r, WIDTH)) / 8
      kernel = params[f"dense{i}"]["kernel"]
      teacher[f"dense{i}"]["kernel"] = kernel + jnp.asarray(delta, jnp.float32)

  model = jaxrank.wrap(base, targets="all-linear", adapter=jaxrank.SaLoRA(rank=RANK, alpha=RANK))
  variables = model.init(jax.random.key(seed + 1), jnp.ones((1, WIDTH)))
  variables["params"] = params  # the "pretrained" weights
  variables = jaxrank.add_lagrange_multiplier(variables)  # λ = 0 in gates/lagrange_multiplier
  frozen, trainable = jaxrank.split_variables(variables)

  inner = optax.multi_transform(
      {"lora": optax.adam(1e-2), "gates": optax.adam(0.1)}, jaxrank.collection_labels)
  tx = jaxrank.lagrangian_ascent(1.0, inner, t_start=T_START, t_end=T_END, total_steps=STEPS)
  opt_state = tx.init(trainable)

  def loss_fn(trainable, x, key):
    v = jaxrank.join_variables(frozen, trainable)
    prediction = model.apply(v, x, rngs={"hard_concrete": key})
    task = jnp.mean((prediction - base.apply({"params": teacher}, x)) ** 2)
    return task + jaxrank.salora_penalty(model, v, target_density=TARGET_DENSITY,
                                 orthogonality_weight=0.01), task

  @jax.jit
  def step(trainable, opt_state, key):
    data_key, gate_key = jax.random.split(key)
    x = jax.random.normal(data_key, (64, WIDTH))
    (_, task), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, x, gate_key)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    c = jaxrank.salora_expected_density(model, jaxrank.join_variables(frozen, trainable))
    return trainable, opt_state, task, c

  print(f"{'step':>5} {'task mse':>9} {'C(Θ)':>7} {'λ':>7}")
  for i in range(STEPS):
    trainable, opt_state, task, c = step(trainable, opt_state, jax.random.key(10_000 * seed + i))
    if i % 100 == 0 or i == STEPS - 1:
      lam = float(jaxrank.lagrange_multiplier(trainable))
      print(f"{i:5d} {float(task):9.4f} {float(c):7.4f} {lam:7.3f}")

  variables = jaxrank.join_variables(frozen, trainable)
  hard = jaxrank.salora_harden(model, variables)  # exact 0/1 gates, budget = C(Θ)
  lora_model, lora_variables, pattern = jaxrank.compact(model, hard)

  x = jax.random.normal(jax.random.key(99), (512, WIDTH))
  target = base.apply({"params": teacher}, x)
  mse = lambda y: float(jnp.mean((y - target) ** 2))
  gated = model.apply(hard, x)
  compacted = lora_model.apply(lora_variables, x)
  print(f"target density b = {TARGET_DENSITY}; expected density C(Θ) = "
        f"{float(jaxrank.salora_expected_density(model, variables)):.4f}; hardened density = "
        f"{jaxrank.salora_density(model, hard):.4f}")
  print(f"deterministic-gate (Louizos) density before hardening = "
        f"{jaxrank.salora_density(model, variables):.4f}")
  print(f"planted ranks {dict(zip(pattern, PLANTED))}")
  print(f"learned ranks {pattern}")
  print(f"adapter parameters: {jaxrank.trainable_parameter_count(variables)} trained -> "
        f"{jaxrank.count_parameters(lora_variables)['lora']} in the compact LoRA")
  print(f"held-out mse: frozen base {mse(base.apply({'params': params}, x)):.4f}, hardened "
        f"SaLoRA {mse(gated):.4f}, compact LoRA {mse(compacted):.4f} "
        f"(max |difference| {float(jnp.max(jnp.abs(gated - compacted))):.2e})")
  print(f"time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
