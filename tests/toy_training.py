"""The small training run shared by the resume and multi-device tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxrank

BATCH, FEATURES, OUTPUTS = 16, 6, 4


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUTPUTS, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))


def data(total_steps):
  x = jax.random.normal(jax.random.key(1), (total_steps, BATCH, FEATURES))
  return x, jnp.sin(x[..., :OUTPUTS] * 2.0)


def setup(config, total_steps):
  """(model, frozen, state, (x_all, y_all)) for a method config."""
  model = jaxrank.wrap(MLP(), adapter=config.adapter)
  x_all, y_all = data(total_steps)
  variables = config.prepare(model.init(jax.random.key(0), x_all[0]))
  frozen, trainable = jaxrank.split_variables(variables)
  state = {"step": jnp.array(0, jnp.int32), "trainable": trainable,
           "opt_state": config.optimizer.init(trainable), "rng": jax.random.key(42)}
  return model, frozen, state, (x_all, y_all)


def make_step(config, model, axis_name=None):
  """A pure train step ``(state, frozen, x, y) -> state``; pmeans grads over ``axis_name``."""
  tx = config.optimizer

  def train_step(state, frozen, x, y):
    rng, sample_rng = jax.random.split(state["rng"])

    def loss_fn(trainable):
      v = jaxrank.join_variables(frozen, trainable)
      out = model.apply(v, x, rngs={"dropout": sample_rng, "hard_concrete": sample_rng})
      return jnp.mean((out - y) ** 2) + config.penalty(model, v)

    grads = jax.grad(loss_fn)(state["trainable"])
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"],
                                   **config.extra_args(model, frozen, x, y))
    return {"step": state["step"] + 1,
            "trainable": optax.apply_updates(state["trainable"], updates),
            "opt_state": opt_state, "rng": rng}

  return train_step
