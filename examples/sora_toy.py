"""SoRA on a planted-rank toy regression: the gates find each layer's true rank.

A frozen random base model has three linear layers ``first``, ``second``, ``third`` reading the
same input. The teacher is the same base with a weight update of rank 1, 3 and 0 added to the
three layers. A SoRA student (r_max = 6 per layer) is trained with the paper's recipe: AdamW on
the factors, SGD + the proximal soft-threshold (eq. 10-11) on the gates. The script prints the
gates, the learned rank per layer, the loss, then post-prunes to a plain LoRA (eq. 12) and checks
that it computes the same function. Finally it runs the sparsifying scheduler (Algorithm 1) from
a dense phase to ever larger λ.

Run: python examples/sora_toy.py
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrank
import jaxrank

PLANTED = {"first": 1, "second": 3, "third": 0}
R_MAX, IN_DIM, OUT_DIM, N = 6, 8, 6, 256


class Heads(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([nn.Dense(OUT_DIM, name=n)(x) for n in PLANTED], axis=-1)


def make_task(seed=0):
  base = Heads()
  x = jax.random.normal(jax.random.key(1000 + seed), (N, IN_DIM))
  params = base.init(jax.random.key(seed), x)["params"]
  teacher = dict(params)
  key = jax.random.key(10 + seed)
  for name, r in PLANTED.items():
    if r == 0:
      continue
    key, ku, kv = jax.random.split(key, 3)
    u = jnp.linalg.qr(jax.random.normal(ku, (IN_DIM, r)))[0]
    v = jnp.linalg.qr(jax.random.normal(kv, (OUT_DIM, r)))[0]
    delta = (u * jnp.linspace(1.5, 0.75, r)) @ v.T
    teacher[name] = {**params[name], "kernel": params[name]["kernel"] + delta}
  teacher_fn = lambda inputs: base.apply({"params": teacher}, inputs)
  model = jaxrank.wrap(base, adapter=jaxrank.SoRA(rank=R_MAX, alpha=R_MAX))
  variables = {**model.init(jax.random.key(100 + seed), x), "params": params}
  return model, variables, x, teacher_fn


def train(tx, loss, trainable, steps):
  def step(carry, _):
    trainable, state = carry
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return (optax.apply_updates(trainable, updates), state), value

  run = jax.jit(lambda t: jax.lax.scan(step, (t, tx.init(t)), None, length=steps))
  (trainable, _), losses = run(trainable)
  return trainable, losses


def main():
  start = time.time()
  model, variables, x, teacher = make_task(seed=0)
  y = teacher(x)
  x_eval = jax.random.normal(jax.random.key(7), (128, IN_DIM))
  y_eval = teacher(x_eval)
  frozen, trainable = jaxrank.split_variables(variables)
  mse = lambda t, xs, ys: jnp.mean((model.apply({**frozen, **t}, xs) - ys) ** 2)
  loss = lambda t: mse(t, x, y)

  steps = 1500
  tx = jaxrank.sora_optimizer(
      optax.adamw(optax.cosine_decay_schedule(1e-2, steps), weight_decay=0.1),
      lam=0.05,
      gate_learning_rate=optax.cosine_decay_schedule(0.1, steps),
  )
  trained, losses = train(tx, loss, trainable, steps)
  variables = jaxrank.join_variables(frozen, trained)
  print(f"planted ranks : {PLANTED}")
  print(f"learned ranks : {jaxrank.rank_pattern(model, variables)}")
  for name in PLANTED:
    print(f"  g[{name:6s}] = {np.round(np.asarray(trained['gates'][name]['g']), 4).tolist()}")
  print(f"train mse     : {float(losses[0]):.4g} (step 0) -> {float(loss(trained)):.4g}")
  print(f"eval mse      : {float(mse(trained, x_eval, y_eval)):.4g}")
  print(f"gate sparsity : {jaxrank.sora_gate_sparsity(model, variables):.3f}")

  lora_model, lora_vars, pattern = jaxrank.compact(model, variables)
  gated = model.apply(variables, x_eval)
  pruned = lora_model.apply(lora_vars, x_eval)
  shapes = {n: lora_vars["lora"][n]["A"].shape[-1] for n in PLANTED}
  print(f"compact       : plain LoRA ranks {shapes}, "
        f"max |pruned - gated| = {float(jnp.max(jnp.abs(pruned - gated))):.2e}")
  print(f"parameters    : {jaxrank.trainable_parameter_count(variables)} trained, "
        f"{jaxrank.effective_parameter_count(model, variables)} after pruning")

  print("\nsparsifying scheduler (Algorithm 1), 400 steps per phase, fresh optimizer per phase:")
  model2, variables2, x2, teacher2 = make_task(seed=2)
  frozen2, _ = jaxrank.split_variables(variables2)
  y2, y2_eval = teacher2(x2), teacher2(x_eval)
  mse2 = lambda v, xs, ys: float(jnp.mean((model2.apply(v, xs) - ys) ** 2))

  def train_phase(v, lam, phase):
    _, t = jaxrank.split_variables(v)
    tx = jaxrank.sora_optimizer(optax.adamw(1e-2, weight_decay=0.1), lam, 0.1)
    loss2 = lambda t: jnp.mean((model2.apply({**frozen2, **t}, x2) - y2) ** 2)
    return jaxrank.join_variables(frozen2, train(tx, loss2, t, 400)[0])

  def show(r):
    print(f"  phase {r.phase} λ={r.lam:<5g} sparsity={r.sparsity:.3f} ranks={r.rank_pattern} "
          f"train mse={r.train_metric:.3g} eval mse={r.eval_metric:.3g}")

  jaxrank.sparsifying_scheduler(
      model2, variables2, [0.0, 0.05, 0.1, 0.2], train_phase,
      train_metric=lambda v: mse2(v, x2, y2),
      eval_metric=lambda v: mse2(v, x_eval, y2_eval),
      on_phase=show)
  print(f"\ntotal {time.time() - start:.1f} s")


if __name__ == "__main__":
  main()
