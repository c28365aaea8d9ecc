"""How an adapter attaches to ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` in place.

:func:`adapt_layer` turns one layer object into an adapted one: its class becomes a subclass
(``AdaptedLinear`` ...) whose ``__call__`` adds ``scale * ((dropout(x) @ A) * gate) @ B`` to the
base output, and it gains two sub-modules named after the Linen collections::

    layer.kernel, layer.bias      nnx.Param      (untouched, frozen by filter)
    layer.lora.A, layer.lora.B    nnx.LoRAParam  (or P/Q for AdaLoRA)
    layer.gates.<name>            Gate           (SoRA g, AdaLoRA singular_values, ...)

so NNX state paths read ``hidden/lora/A`` and ``hidden/gates/g``. The math is the Linen
wrap's (``_adapter`` specs and ``_layers`` layouts), so both frameworks compute the same thing.

Stochastic parts (dropout, SaLoRA's hard-concrete gate) draw only inside
``with jaxrank.nnx.rngs(dropout=key, hard_concrete=key):``; the key a layer at ``path`` gets is
the one Linen's ``make_rng`` gives at that path (``LazyRng(key, *path, 1)``), so a Linen and an
NNX model fed the same key draw the same noise.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxrank import _adapter, _nnx_layers
  >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  >>> _nnx_layers.adapt_layer(layer, "", _adapter.LoRA(rank=2), nnx.Rngs(1))
  >>> type(layer).__name__, layer.lora.A.shape, layer(jnp.ones((1, 3))).shape
  ('AdaptedLinear', (3, 2), (1, 4))
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import scope as flax_scope

from jaxrank import _adapter
from jaxrank import _layers


class Gate(nnx.Variable):
  """The Variable type of adapter gates (collection ``gates``); not an ``nnx.Param``.

  Select it with a filter (``nnx.state(model, Gate)``) or leave it out of an optimizer.
  """


class LoRAGate(nnx.LoRAParam, Gate):
  """A :class:`Gate` that is also an ``nnx.LoRAParam``: for trainers that train exactly
  ``wrt=nnx.LoRAParam`` (tunix's ``PeftTrainer``), ``jaxrank.nnx.wrap(..., gate_type=LoRAGate)``.

  ``Gate`` and ``jaxrank.nnx.TRAINABLE`` still select it; ``jaxrank.nnx.BASE`` leaves it out.
  """


class Factors(nnx.Module):
  """Holds an adapted layer's ``A``/``B`` (or ``P``/``Q``) ``nnx.LoRAParam``s."""


class Gates(nnx.Module):
  """Holds an adapted layer's :class:`Gate` variables (and SaLoRA's λ on the root)."""


_RNGS: contextvars.ContextVar[Optional[Mapping[str, jax.Array]]] = contextvars.ContextVar(
    "jaxrank_nnx_rngs", default=None)


@contextlib.contextmanager
def rngs(**keys: jax.Array):
  """Gives adapted NNX layers rng streams (``dropout``, ``hard_concrete``) for the calls inside.

  Enter it *inside* the function you jit, with keys that are arguments of that function.
  """
  token = _RNGS.set({**(_RNGS.get() or {}), **keys})
  try:
    yield
  finally:
    _RNGS.reset(token)


def _rng_for(path: str):
  keys = _RNGS.get() or {}
  names = tuple(path.split("/")) if path else ()

  def rng_for(name: str):
    key = keys.get(name)
    if key is None:
      return None
    return flax_scope.LazyRng.create(key, *names, 1).as_jax_rng()  # Linen's make_rng key

  rng_for.has = lambda name: name in keys
  return rng_for


# --- layouts --------------------------------------------------------------------------------
def _check_supported(layer: nnx.Module, path: str):
  if isinstance(layer, nnx.LinearGeneral) and layer.batch_axis:
    raise ValueError(
        f"jaxrank cannot adapt nnx.LinearGeneral {path!r} with batch_axis={dict(layer.batch_axis)}:"
        " its kernel is per-batch-index. Leave this layer out of `targets`.")


def _shapes(layer: nnx.Module, path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(in_shape, out_shape)`` of the kernel of a supported layer."""
  if isinstance(layer, nnx.Linear):
    return (layer.in_features,), (layer.out_features,)
  if isinstance(layer, nnx.LinearGeneral):
    return tuple(layer.in_features), tuple(layer.out_features)
  layout = _layers._einsum_layout(layer.einsum_str, types.SimpleNamespace(shape=layer.kernel.shape),
                                  path)
  return layout.in_shape, layout.out_shape


def _layout(layer: nnx.Module, x: jax.Array, einsum_str: Optional[str]) -> _layers.Layout:
  if isinstance(layer, nnx.Linear):
    return _layers._contract_layout(x.ndim, x.shape, (x.ndim - 1,), (layer.out_features,))
  if isinstance(layer, nnx.LinearGeneral):
    axis = tuple(sorted(a % x.ndim for a in layer.axis))
    return _layers._contract_layout(x.ndim, x.shape, axis, tuple(layer.out_features))
  return _layers._einsum_layout(einsum_str or layer.einsum_str,
                                types.SimpleNamespace(shape=layer.kernel.shape),
                                layer._jaxrank_path)


# --- the adapted classes --------------------------------------------------------------------
class _AdapterMixin:
  """Adds the adapter branch to a linear layer's ``__call__``."""

  __slots__ = ()  # so that a layer's ``__class__`` can become its adapted subclass

  def _jaxrank_branch(self, x: jax.Array, layout: _layers.Layout) -> jax.Array:
    adapter: _adapter.LoRA = self._jaxrank_adapter
    down = getattr(self.lora, adapter.down_name).get_value()
    up = getattr(self.lora, adapter.up_name).get_value()
    gates = {name: getattr(self.gates, name).get_value() for name in adapter.gate_names}
    return adapter.branch(x, layout, down, up, gates, _rng_for(self._jaxrank_path))


class AdaptedLinear(nnx.Linear, _AdapterMixin):  # mixin last: same layout
  """An ``nnx.Linear`` with a jaxrank adapter (made by ``jaxrank.nnx.wrap``)."""

  def __call__(self, inputs, *args, **kwargs):
    y = super().__call__(inputs, *args, **kwargs)
    return y + self._jaxrank_branch(inputs, _layout(self, inputs, None)).astype(y.dtype)


class AdaptedLinearGeneral(nnx.LinearGeneral, _AdapterMixin):  # mixin last: same layout
  """An ``nnx.LinearGeneral`` with a jaxrank adapter (made by ``jaxrank.nnx.wrap``)."""

  def __call__(self, inputs, *args, **kwargs):
    y = super().__call__(inputs, *args, **kwargs)
    return y + self._jaxrank_branch(inputs, _layout(self, inputs, None)).astype(y.dtype)


class AdaptedEinsum(nnx.Einsum, _AdapterMixin):  # mixin last: same layout
  """An ``nnx.Einsum`` with a jaxrank adapter (made by ``jaxrank.nnx.wrap``)."""

  def __call__(self, inputs, einsum_str=None, *args, **kwargs):
    y = super().__call__(inputs, einsum_str, *args, **kwargs)
    return y + self._jaxrank_branch(inputs, _layout(self, inputs, einsum_str)).astype(y.dtype)


# LinearGeneral before Linear is irrelevant (neither subclasses the other); order is the lookup.
ADAPTED = {nnx.Linear: AdaptedLinear, nnx.LinearGeneral: AdaptedLinearGeneral,
           nnx.Einsum: AdaptedEinsum}
LINEAR_TYPES = tuple(ADAPTED)


def _adapted_class(cls: type) -> type:
  for base, adapted in ADAPTED.items():
    if cls is base:
      return adapted
  raise TypeError(
      f"jaxrank.nnx can adapt nnx.Linear, nnx.LinearGeneral and nnx.Einsum; {cls.__name__} is "
      "a subclass of one of them, which jaxrank does not rewrite. Leave it out of `targets`.")


def _factor_metadata(kernel: nnx.Variable, n_in: int, down: bool) -> dict[str, Any]:
  """The kernel's sharding metadata carried over to ``A`` (in axes) or ``B`` (out axes)."""
  metadata = kernel.get_metadata()
  names = metadata.get("out_sharding", metadata.get("sharding_names"))
  if names is None:
    return {}
  names = tuple(names)
  entries = (*names[:n_in], None) if down else (None, *names[n_in:])
  out = {"out_sharding": entries}
  if "eager_sharding" in metadata:
    out["eager_sharding"] = metadata["eager_sharding"]
  return out


def adapt_layer(layer: nnx.Module, path: str, adapter: _adapter.LoRA, rngs: nnx.Rngs,
                gate_type: type = Gate) -> None:
  """Adapts one linear ``layer`` (at ``/``-joined ``path``) in place; gates are ``gate_type``."""
  if isinstance(layer, _AdapterMixin):
    raise ValueError(f"layer {path!r} already has a jaxrank adapter.")
  _check_supported(layer, path)
  adapted = _adapted_class(type(layer))
  in_shape, out_shape = _shapes(layer, path)
  kernel = layer.kernel
  factors = Factors()
  setattr(factors, adapter.down_name, nnx.LoRAParam(
      adapter.init_down(rngs.params(), in_shape), **_factor_metadata(kernel, len(in_shape), True)))
  setattr(factors, adapter.up_name, nnx.LoRAParam(
      adapter.init_up(rngs.params(), out_shape), **_factor_metadata(kernel, len(in_shape), False)))
  layer.__class__ = adapted
  layer.lora = factors
  layer.gates = Gates()
  if adapter.gate_names:
    for name, value in adapter.init_gates(rngs.params()).items():
      setattr(layer.gates, name, gate_type(jnp.asarray(value)))
  layer._jaxrank_adapter = adapter
  layer._jaxrank_path = path


def is_adapted(module: Any) -> bool:
  return isinstance(module, _AdapterMixin)


def gate_type_of(model: nnx.Module) -> type:
  """The Variable type of ``model``'s gates (:class:`Gate` when it has none yet)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Gate):
      return type(node)
  return Gate
