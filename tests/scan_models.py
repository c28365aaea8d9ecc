"""The nn.scan test model shared by the method and wrap tests: 3 stacked residual Dense blocks."""

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return carry + nn.Dense(carry.shape[-1], name="mix")(jnp.tanh(carry)), None


class Scanned(nn.Module):
  """``length`` copies of :class:`Block` under ``nn.scan``, stacked on axis 0 of every
  collection in ``variable_axes``; the stack is named ``stack_name``."""

  variable_axes: tuple = ("params", "lora", "gates")
  stack_name: str = "layers"
  length: int = 3

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={c: 0 for c in self.variable_axes},
                    split_rngs={"params": True, "hard_concrete": True}, length=self.length)
    return stack(name=self.stack_name)(x, None)[0]
