"""One small training configuration per method, shared by the resume and multi-device tests.

Each entry maps total optimizer steps to a Config: the adapter spec, the optax transformation,
the extra loss term and the extra args its update needs.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import jaxrank


class Config(NamedTuple):
  adapter: Any
  optimizer: optax.GradientTransformation
  penalty: Callable = lambda model, variables: jnp.zeros(())
  extra_args: Callable = lambda model, frozen, x, y: {}
  prepare: Callable = lambda variables: variables  # e.g. add SaLoRA's Lagrange multiplier


def lora(total_steps, axis_name=None):
  del axis_name  # nothing ranked across devices
  del total_steps
  return Config(jaxrank.LoRA(rank=4), optax.adamw(1e-2))


def lora_dropout(total_steps, axis_name=None):
  del axis_name  # nothing ranked across devices
  del total_steps
  return Config(jaxrank.LoRA(rank=4, dropout=0.1), optax.adamw(1e-2))


def salora(total_steps, axis_name=None):
  del axis_name  # nothing ranked across devices
  inner = optax.partition({"lora": optax.adam(1e-2), "gates": optax.adam(0.1)},
                          jaxrank.collection_labels)
  tx = jaxrank.lagrangian_ascent(1.0, inner, t_start=total_steps // 4,
                                 t_end=3 * total_steps // 4, total_steps=total_steps)
  penalty = lambda model, v: jaxrank.salora_penalty(model, v, target_density=0.5,
                                                     orthogonality_weight=0.01)
  return Config(jaxrank.SaLoRA(rank=4), tx, penalty, prepare=jaxrank.add_lagrange_multiplier)


def alora(total_steps, axis_name=None):
  from jaxrank import ALoRA, alora as alora_transform

  x_val = jax.random.normal(jax.random.key(7), (32, 6))
  y_val = jnp.sin(x_val[:, :4] * 2.0)
  adapter = ALoRA(rank=4, initial_rank=2)

  def loss_fn(trainable, batch):
    frozen, x, y = batch
    model = jaxrank.wrap(toy_model(), adapter=adapter)
    return jnp.mean((model.apply(jaxrank.join_variables(frozen, trainable), x) - y) ** 2)

  rounds = 3
  recovery = max(1, total_steps // (rounds + 2))
  tx = alora_transform(optax.adam(1e-2), adapter, loss_fn, warmup_steps=recovery,
                       recovery_steps=recovery, num_rounds=rounds, ranks_per_round=1,
                       total_steps=total_steps,
                       chunk_size=4, axis_name=axis_name)
  return Config(adapter, tx,
                extra_args=lambda model, frozen, x, y: {"validation_batch": (frozen, x_val, y_val)})


def sora(total_steps, axis_name=None):
  del axis_name  # nothing ranked across devices
  del total_steps
  tx = jaxrank.sora_optimizer(optax.adam(1e-2), lam=0.05, gate_learning_rate=0.1)
  return Config(jaxrank.SoRA(rank=4), tx)


def adalora(total_steps, axis_name=None):
  from jaxrank import AdaLoRA, adalora as adalora_transform

  tx = adalora_transform(optax.adam(1e-2), init_r=4, target_r=2, tinit=total_steps // 6,
                         tfinal=total_steps // 4, total_step=total_steps, deltaT=2,
                         beta1=0.85, beta2=0.85, axis_name=axis_name)
  penalty = lambda model, v: 0.1 * jaxrank.orthogonality_penalty(model, v, form="peft")
  return Config(AdaLoRA(rank=4, alpha=8.0), tx, penalty)


def toy_model():
  import toy_training
  return toy_training.MLP()


CONFIGS = {"lora": lora, "lora_dropout": lora_dropout, "sora": sora, "adalora": adalora,
           "salora": salora, "alora": alora}
