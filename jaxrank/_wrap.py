"""``wrap``: add adapters to any Flax Linen model without touching its code.

The returned module runs the base model inside ``flax.linen.intercept_methods``. The
interceptor is entered *inside* the wrapped module's ``init``/``apply``, so a jitted function
can never run the model without its adapters (the stale-jit-cache trap of entering an
interceptor around an already traced ``jax.jit(model.apply)``).

For every targeted ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` call the interceptor creates
(at ``init``) or reads (at ``apply``) the adapter factors in collection ``lora`` and the gate
variables in collection ``gates`` *in the layer's own scope*, so adapter paths mirror base
paths: ``lora/encoder/layer/0/attention/self/query/A``. ``module.scope.variable`` is used so
layers defined in ``setup`` work as well as ``@nn.compact`` ones.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
  >>> model = jaxrank.wrap(MLP(), targets=["hidden"], adapter=jaxrank.LoRA(rank=4))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> sorted(variables), sorted(variables["lora"]["hidden"])
  (['lora', 'params'], ['A', 'B'])
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Optional, Sequence, Union

import flax.errors
import flax.linen as nn

from jaxrank import _adapter
from jaxrank import _layers

Targets = Union[str, Sequence[str]]

_SCAN_HINT = (
    "If the model uses nn.scan (or another lifted transform with `variable_axes`), add the "
    "adapter collections to it, e.g. nn.scan(Block, variable_axes={'params': 0, 'lora': 0, "
    "'gates': 0}, split_rngs={'params': True, 'dropout': True}, ...)."
)


@dataclasses.dataclass(frozen=True)
class TargetMatcher:
  """Which layers get an adapter.

  * ``"all-linear"``: every ``Dense``/``DenseGeneral``/``Einsum`` except the task output head
    (a layer named ``lm_head``, ``classifier``, ``score`` or ``qa_outputs``), as in PEFT.
  * a list of names (PEFT ``target_modules`` meaning): a name matches a layer whose
    ``/``-joined path equals it or ends with ``/name`` (``"query"`` matches
    ``encoder/layer/0/attention/self/query``).
  * any other string: a regular expression that must match the whole ``/``-joined path.
  """

  targets: Targets

  def __post_init__(self):
    targets = self.targets
    if isinstance(targets, str):
      if targets != "all-linear":
        try:
          re.compile(targets)
        except re.error as e:
          raise ValueError(f"targets={targets!r} is not a valid regular expression: {e}") from e
    else:
      targets = tuple(targets)
      if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"targets must be 'all-linear', a regex string or a non-empty list of layer "
            f"names, got {self.targets!r}."
        )
      object.__setattr__(self, "targets", targets)

  @property
  def patterns(self) -> tuple[str, ...]:
    return (self.targets,) if isinstance(self.targets, str) else self.targets

  def matching_patterns(self, path: tuple[str, ...]) -> tuple[str, ...]:
    joined = "/".join(path)
    if self.targets == "all-linear":
      return () if _layers.is_output_head(path) else ("all-linear",)
    if isinstance(self.targets, str):
      return (self.targets,) if re.fullmatch(self.targets, joined) else ()
    return tuple(
        name for name in self.targets if joined == name or joined.endswith("/" + name)
    )


class _Trace:
  """What one init/apply call saw: linear layers and which patterns matched."""

  def __init__(self):
    self.linear_paths: list[str] = []
    self.matched: set[str] = set()
    # at apply: each adapted layer's (rank, down shape, expected down shape) in the variables
    self.ranks: dict[str, tuple] = {}
    self.too_big: list[str] = []  # at init: layers smaller than the adapter's rank


def _rng_for(module: nn.Module):
  def rng_for(name: str):
    return module.make_rng(name) if module.scope.has_rng(name) else None

  rng_for.has = module.scope.has_rng  # asks without drawing a key
  return rng_for


def _variable(module: nn.Module, collection: str, name: str, init_fn):
  try:
    return module.scope.variable(collection, name, init_fn).value
  except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFoundError) as e:
    path = "/".join(module.path)
    if module.is_initializing():
      raise ValueError(
          f"jaxrank could not create {collection}/{path}/{name}: the collection {collection!r} "
          f"is not available inside this part of the model. {_SCAN_HINT}"
      ) from e
    raise ValueError(
        f"jaxrank found no {collection}/{path}/{name} in the variables passed to apply. Pass "
        f"all collections returned by the wrapped model's init ('params', 'lora', 'gates'), "
        f"e.g. model.apply({{**frozen, **trainable}}, ...). {_SCAN_HINT}"
    ) from e


class RankExceedsLayerWarning(UserWarning):
  """An adapter's rank is larger than ``min(fan_in, fan_out)`` of a layer it adapts."""


def _rank_too_big(module: nn.Module, adapter: _adapter.LoRA,
                  layout: _layers.Layout) -> Optional[str]:
  """The error message when ``adapter.rank`` exceeds the layer's ``min(fan_in, fan_out)``."""
  fan_in, fan_out = math.prod(layout.in_shape), math.prod(layout.out_shape)
  if adapter.rank <= min(fan_in, fan_out):
    return None
  return (f"jaxrank.wrap: rank {adapter.rank} is larger than layer {'/'.join(module.path)!r} "
          f"allows: its kernel is {fan_in} x {fan_out}, so its rank is at most "
          f"{min(fan_in, fan_out)}: ranks above it only add parameters (the rank pattern still "
          f"counts them). Use a rank <= {min(fan_in, fan_out)}, or leave the layer out of "
          f"`targets`.")


def _mismatch(module, collection, name, expected, found, adapter, cause):
  path = "/".join(module.path)
  return ValueError(
      f"jaxrank: {collection}/{path}/{name} expects shape {tuple(expected)} (adapter "
      f"{type(adapter).__name__}(rank={adapter.rank}) on layer {path!r}) but has "
      f"{tuple(found)}. {cause}")


def _check_factor_shapes(module, adapter: _adapter.LoRA, layout: _layers.Layout, down, up):
  """The ``lora`` factors passed to ``apply`` must fit the spec and the layer.

  Their rank axis may be smaller than ``adapter.rank`` (a compacted or PEFT-loaded plain
  LoRA keeps each layer's own rank; the spec's rank is the largest), but never larger, and
  down's and up's must agree; :func:`_check_ranks` checks the largest equals the spec's.
  """
  in_shape, out_shape = tuple(layout.in_shape), tuple(layout.out_shape)
  found_rank = down.shape[-1] if down.ndim else None
  rank = found_rank if found_rank is not None and found_rank <= adapter.rank else adapter.rank
  rank_hint = (f"The variables look like they were made by an adapter of rank {found_rank}: "
               f"wrap the model with the adapter spec that made them (e.g. "
               f"{type(adapter).__name__}(rank={found_rank}, ...)).")
  if tuple(down.shape) != (*in_shape, rank):
    cause = (rank_hint if tuple(down.shape[:-1]) == in_shape else
             "The layer's input size differs from the one the variables were made for: "
             "another base model (or config) than at init?")
    raise _mismatch(module, "lora", adapter.down_name, (*in_shape, adapter.rank), down.shape,
                    adapter, cause)
  if tuple(up.shape) != (rank, *out_shape):
    cause = (f"{adapter.down_name} has rank {rank} but {adapter.up_name} has rank "
             f"{up.shape[0] if up.ndim else None}: the factors come from different adapters."
             if tuple(up.shape[1:]) == out_shape else
             "The layer's output size differs from the one the variables were made for: "
             "another base model (or config) than at init?")
    raise _mismatch(module, "lora", adapter.up_name, (rank, *out_shape), up.shape, adapter,
                    cause)
  return found_rank


def _check_gate_shapes(module, adapter: _adapter.LoRA, gates):
  import jax
  expected = jax.eval_shape(adapter.init_gates, jax.random.key(0))
  for name, value in gates.items():
    want = getattr(expected.get(name), "shape", None)
    if want is not None and tuple(value.shape) != tuple(want):
      raise _mismatch(module, "gates", name, want, value.shape, adapter,
                      f"The gate variables were made by another adapter spec (rank "
                      f"{value.shape[-1] if value.ndim else None}?): wrap the model with the "
                      f"spec that made them.")


def adapter_branch(module: nn.Module, adapter: _adapter.LoRA, layout: _layers.Layout, x,
                   trace: Optional["_Trace"] = None):
  """``scale * ((dropout(x) @ down) * gate) @ up`` for one bound linear ``module``.

  At ``apply`` the factors' and gates' shapes are checked against ``adapter`` and the layer
  (a clear error instead of wrong outputs); ``trace`` collects each layer's rank.
  """
  in_shape, out_shape = layout.in_shape, layout.out_shape
  rng = lambda: module.make_rng("params")
  if module.is_initializing():
    too_big = _rank_too_big(module, adapter, layout)
    if too_big and trace is None:
      warnings.warn(too_big, RankExceedsLayerWarning, stacklevel=2)
    if too_big:
      trace.too_big.append(too_big)  # warned after the target check (Adapted.__call__)
  down = _variable(module, "lora", adapter.down_name, lambda: adapter.init_down(rng(), in_shape))
  up = _variable(module, "lora", adapter.up_name, lambda: adapter.init_up(rng(), out_shape))
  if not module.is_initializing():
    found = _check_factor_shapes(module, adapter, layout, down, up)
    if trace is not None:
      trace.ranks["/".join(module.path)] = (found, tuple(down.shape),
                                            (*layout.in_shape, adapter.rank))
  initial_gates = {}  # filled once, at init, by the first gate variable created

  def init_gate(name):
    if not initial_gates:
      initial_gates.update(adapter.init_gates(rng()))
    return initial_gates[name]

  gates = {
      name: _variable(module, "gates", name, lambda name=name: init_gate(name))
      for name in adapter.gate_names
  }
  if gates and not module.is_initializing():
    _check_gate_shapes(module, adapter, gates)
  return adapter.branch(x, layout, down, up, gates, _rng_for(module))


def _make_interceptor(adapter: _adapter.LoRA, matcher: TargetMatcher, trace: _Trace):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _layers.LINEAR_TYPES):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    trace.linear_paths.append("/".join(path))
    patterns = matcher.matching_patterns(path)
    if not patterns:
      return next_fun(*args, **kwargs)
    trace.matched.update(patterns)
    layout = _layers.layout_for(module, args, kwargs)
    x = args[0] if args else kwargs["inputs"]
    y = next_fun(*args, **kwargs)
    return y + adapter_branch(module, adapter, layout, x, trace).astype(y.dtype)

  return interceptor


class Adapted(nn.Module):
  """A Linen module that behaves like ``model`` plus adapters on the targeted layers.

  Build it with :func:`wrap`. Its ``params`` tree is exactly the base model's (the scopes are
  shared); ``init`` adds the collections ``lora`` and ``gates``.
  """

  # The field's name becomes a child name in the shared scope, so it must not collide with
  # the base model's own children (Hugging Face modules have a child called "model").
  wrapped_model: nn.Module
  adapter: _adapter.LoRA
  matcher: TargetMatcher

  def __post_init__(self):
    super().__post_init__()
    if self.scope is not None:
      nn.share_scope(self, self.wrapped_model)

  def __call__(self, *args, **kwargs):
    trace = _Trace()
    with nn.intercept_methods(_make_interceptor(self.adapter, self.matcher, trace)):
      out = self.wrapped_model(*args, **kwargs)
    if self.is_initializing():
      _check_matches(self.matcher, trace)
      for message in dict.fromkeys(trace.too_big):
        warnings.warn(message, RankExceedsLayerWarning, stacklevel=3)
    else:
      _check_ranks(self.adapter, trace)
    return out


def _check_ranks(adapter: _adapter.LoRA, trace: _Trace):
  """The largest rank in the variables must be the spec's (compacted layers may be smaller)."""
  if not trace.ranks:
    return
  largest = max(rank for rank, _, _ in trace.ranks.values())
  if 0 < largest < adapter.rank:
    path, (_, found, expected) = next((p, v) for p, v in trace.ranks.items() if v[0] == largest)
    raise ValueError(
        f"jaxrank: lora/{path}/{adapter.down_name} expects shape {expected} but has {found}: "
        f"the adapter variables have rank {largest} at most, but this model's adapter is "
        f"{type(adapter).__name__}(rank={adapter.rank}): its scale alpha/rank and its gates "
        f"would be wrong. The variables look like they were made by an adapter of rank "
        f"{largest}: wrap the model with that spec (e.g. "
        f"{type(adapter).__name__}(rank={largest}, ...)), or use the model jaxrank.compact "
        f"returned with its variables.")


def _check_matches(matcher: TargetMatcher, trace: _Trace):
  missing = [p for p in matcher.patterns if p not in trace.matched]
  if not missing:
    return
  seen = sorted(set(trace.linear_paths))
  listing = "\n  ".join(seen) if seen else "(none: the model called no nn.Dense/DenseGeneral/Einsum)"
  raise ValueError(
      f"jaxrank.wrap: target pattern(s) {missing} matched no linear layer. A name matches a "
      f"path's last components (PEFT target_modules), a single string other than "
      f"'all-linear' is a regex over the whole path. The linear layers of this model are:\n  "
      f"{listing}"
  )


def wrap(
    model: nn.Module,
    targets: Targets = "all-linear",
    adapter: Optional[_adapter.LoRA] = None,
) -> Adapted:
  """Returns ``model`` with an adapter on every targeted linear layer.

  Args:
    model: any Flax Linen module (for a Hugging Face Flax model, pass ``hf_model.module``).
    targets: ``"all-linear"``, a list of layer names with PEFT ``target_modules`` meaning
      (each matches the end of a layer's path), or a regex over the whole ``/``-joined path.
      A pattern that matches no layer raises a ``ValueError`` listing the layers that exist.
    adapter: an adapter spec such as :class:`jaxrank.LoRA` (the default, ``LoRA()``),
      :class:`jaxrank.SoRA`, ... .

  Returns:
    An :class:`Adapted` module. Its ``init`` returns ``params`` (the base model's, same
    paths), ``lora`` and (for gated adapters) ``gates``; its ``apply`` adds the adapters'
    outputs. Stochastic parts run only when their rng stream is passed: adapter dropout
    with ``rngs={'dropout': key}``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
    >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.LoRA(rank=2))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> base = nn.Dense(4).apply({"params": variables["params"]}, jnp.ones((1, 3)))
    >>> bool(jnp.allclose(model.apply(variables, jnp.ones((1, 3))), base))
    True
  """
  if not isinstance(model, nn.Module):
    raise TypeError(
        f"jaxrank.wrap expects a flax.linen.Module, got {type(model).__name__}. For a Hugging "
        "Face Flax model pass `hf_model.module`."
    )
  if adapter is None:
    adapter = _adapter.LoRA()
  if not isinstance(adapter, _adapter.LoRA):
    raise TypeError(f"adapter must be a jaxrank adapter spec such as jaxrank.LoRA(), got {adapter!r}")
  return Adapted(wrapped_model=model, adapter=adapter, matcher=TargetMatcher(targets))

