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


def lora(total_steps):
  del total_steps
  return Config(jaxrank.LoRA(rank=4), optax.adamw(1e-2))


def lora_dropout(total_steps):
  del total_steps
  return Config(jaxrank.LoRA(rank=4, dropout=0.1), optax.adamw(1e-2))


CONFIGS = {"lora": lora, "lora_dropout": lora_dropout}
