"""How an adapter attaches to each kind of linear layer.

For a base kernel of shape ``(*in_shape, *out_shape)`` the adapter keeps ``down`` of shape
``(*in_shape, rank)`` and ``up`` of shape ``(rank, *out_shape)``. A :class:`Layout` knows which
axes of the layer's input are contracted with the kernel and how to contract the input with
``down`` and the rank-space activations with ``up`` so the result has the base output's shape.

Supported: ``nn.Dense``, ``nn.DenseGeneral`` (several input and feature axes, no
``batch_dims``) and ``nn.Einsum`` (kernel axes are contracted axes followed by output axes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LINEAR_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Shapes and contractions of one adapted layer."""

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  # einsum strings: input x down -> hidden, hidden x up -> output
  down_equation: str
  up_equation: str

  def project_down(self, x: jax.Array, down: jax.Array) -> jax.Array:
    return jnp.einsum(self.down_equation, x, down)

  def project_up(self, hidden: jax.Array, up: jax.Array) -> jax.Array:
    return jnp.einsum(self.up_equation, hidden, up)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _fresh_letter(used: str) -> str:
  for letter in _LETTERS:
    if letter not in used:
      return letter
  raise ValueError("ran out of einsum letters")  # pragma: no cover


def _contract_layout(x_ndim: int, x_shape, contract_axes, out_shape) -> Layout:
  """Layout for layers that contract ``contract_axes`` of x and append ``out_shape``."""
  x_letters = _LETTERS[:x_ndim]
  in_letters = "".join(x_letters[a] for a in contract_axes)
  free_letters = "".join(l for l in x_letters if l not in in_letters)
  used = x_letters
  rank_letter = _fresh_letter(used)
  used += rank_letter
  out_letters = ""
  for _ in out_shape:
    out_letters += _fresh_letter(used + out_letters)
  return Layout(
      in_shape=tuple(x_shape[a] for a in contract_axes),
      out_shape=tuple(out_shape),
      down_equation=f"{x_letters},{in_letters}{rank_letter}->{free_letters}{rank_letter}",
      up_equation=f"{free_letters}{rank_letter},{rank_letter}{out_letters}->{free_letters}{out_letters}",
  )


def layout_for(module: nn.Module, args: tuple, kwargs: dict) -> Layout:
  """The :class:`Layout` of a ``Dense``, ``DenseGeneral`` or ``Einsum`` call."""
  x = args[0] if args else kwargs["inputs"]
  path = "/".join(module.path)
  if isinstance(module, nn.Dense):
    return _contract_layout(x.ndim, x.shape, (x.ndim - 1,), (module.features,))
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(
          f"jaxrank cannot adapt nn.DenseGeneral {path!r} with batch_dims="
          f"{module.batch_dims}: its kernel is per-batch-index. Leave this layer out of "
          "`targets`."
      )
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axis = tuple(sorted(a % x.ndim for a in axis))
    features = module.features if isinstance(module.features, tuple) else (module.features,)
    return _contract_layout(x.ndim, x.shape, axis, features)
  if isinstance(module, nn.Einsum):
    equation = (args[1] if len(args) > 1 else kwargs.get("einsum_str")) or module.einsum_str
    return _einsum_layout(equation, module, path)
  raise TypeError(f"{type(module).__name__} is not a supported linear layer")


def _einsum_layout(equation: str, module: Any, path: str) -> Layout:
  equation = equation.replace(" ", "")
  if "..." in equation or "->" not in equation:
    raise ValueError(
        f"jaxrank needs an explicit einsum string without '...' for nn.Einsum {path!r}, "
        f"got {equation!r}."
    )
  inputs, out = equation.split("->")
  lhs, rhs = inputs.split(",")
  contracted = "".join(c for c in rhs if c in lhs and c not in out)
  outputs = "".join(c for c in rhs if c in out and c not in lhs)
  if len(contracted) + len(outputs) != len(rhs) or rhs != contracted + outputs:
    raise ValueError(
        f"jaxrank cannot adapt nn.Einsum {path!r} with {equation!r}: the kernel axes must be "
        "the contracted input axes followed by the output axes (no kernel axis shared with "
        "both input and output, none summed away). Leave this layer out of `targets`."
    )
  shape = tuple(module.shape)
  rank_letter = _fresh_letter(equation)
  free = "".join(c for c in lhs if c not in contracted)
  return Layout(
      in_shape=shape[: len(contracted)],
      out_shape=shape[len(contracted):],
      down_equation=f"{lhs},{contracted}{rank_letter}->{free}{rank_letter}",
      up_equation=f"{free}{rank_letter},{rank_letter}{outputs}->{out}",
  )


def is_output_head(path: tuple[str, ...]) -> bool:
  """Layers that ``"all-linear"`` leaves out, as PEFT does (the task output head)."""
  return bool(path) and path[-1] in ("lm_head", "classifier", "score", "qa_outputs")


def describe(module: nn.Module) -> Optional[str]:
  """A short type name for error messages, or None if the module is not linear."""
  if isinstance(module, LINEAR_TYPES):
    return type(module).__name__
  return None
