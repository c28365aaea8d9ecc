"""One small training configuration per method, shared by the resume and multi-device tests.

Each entry maps total optimizer steps to a Config: the adapter spec, the optax transformation,
the extra loss term and the extra args its update needs.
"""

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import optax

import jaxrank


class Config(NamedTuple):
  adapter: Any
  optimizer: optax.GradientTransformation
  penalty: Callable = lambda model, variables: jnp.zeros(())
  extra_args: Callable = lambda model, frozen, x, y: {}
  prepare: Callable = lambda variables: variables  # e.g. add SaLoRA's Lagrange multiplier


def lora(total_steps):
  del total_steps
  return Config(jaxrank.LoRA(rank=4), optax.adamw(1e-2))


def lora_dropout(total_steps):
  del total_steps
  return Config(jaxrank.LoRA(rank=4, dropout=0.1), optax.adamw(1e-2))


def salora(total_steps):
  from jaxrank import salora as s

  inner = optax.partition({"lora": optax.adam(1e-2), "gates": optax.adam(0.1)},
                          jaxrank.collection_labels)
  tx = s.lagrangian_ascent(1.0, inner, t_start=total_steps // 4, t_end=3 * total_steps // 4,
                           total_steps=total_steps)
  penalty = lambda model, v: s.penalty(model, v, target_density=0.5, orthogonality_weight=0.01)
  return Config(s.SaLoRA(rank=4), tx, penalty, prepare=s.add_lagrange_multiplier)


CONFIGS = {"lora": lora, "lora_dropout": lora_dropout, "salora": salora}
