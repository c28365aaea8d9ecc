"""jaxrank for Flax NNX: adapt an ``nnx.Module`` in place, train it with the same transforms.

``jaxrank.nnx.wrap(model, targets, adapter, rngs=...)`` gives every targeted ``nnx.Linear`` /
``nnx.LinearGeneral`` / ``nnx.Einsum`` (same target vocabulary as :func:`jaxrank.wrap`) the
adapter factors as ``nnx.LoRAParam`` in ``layer.lora`` and its gates as :class:`Gate` in
``layer.gates``. State paths therefore read ``hidden/lora/A`` and ``hidden/gates/g``, and
:func:`to_linen_variables` turns the model's state into the Linen variables dict
``{'params', 'lora', 'gates'}`` (a pure re-keying: ``hidden/lora/A`` → ``lora/hidden/A``), on
which every jaxrank function (rank patterns, penalties, ``compact``, ``merge``, PEFT export)
works unchanged.

The methods' optax transforms run on that view too: :func:`transform` wraps one so that it
takes and returns NNX state trees, for ``nnx.Optimizer(model, jaxrank.nnx.transform(tx),
wrt=jaxrank.nnx.TRAINABLE)``. The base model stays frozen because the filter leaves it out.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import jaxrank
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.hidden = nnx.Linear(3, 8, rngs=rngs)
  ...     self.out = nnx.Linear(8, 2, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.out(jnp.tanh(self.hidden(x)))
  >>> model = jaxrank.nnx.wrap(MLP(nnx.Rngs(0)), ["hidden"], jaxrank.SoRA(rank=4),
  ...                          rngs=nnx.Rngs(1))
  >>> sorted(jaxrank.nnx.to_linen_variables(model)["gates"]["hidden"])
  ['g']
  >>> tx = jaxrank.nnx.transform(jaxrank.sora_optimizer(optax.adam(1e-2), lam=0.5,
  ...                                                   gate_learning_rate=0.1))
  >>> optimizer = nnx.Optimizer(model, tx, wrt=jaxrank.nnx.TRAINABLE)
  >>> @nnx.jit
  ... def step(model, optimizer, x):
  ...   loss = lambda m: jnp.mean(m(x) ** 2)
  ...   grads = nnx.grad(loss, argnums=nnx.DiffState(0, jaxrank.nnx.TRAINABLE))(model)
  ...   optimizer.update(model, grads)
  >>> for _ in range(3):
  ...   step(model, optimizer, jnp.ones((4, 3)))
  >>> jaxrank.nnx.rank_pattern(model)
  {'hidden': 4}
"""

from __future__ import annotations

from typing import Any, Optional

import optax
from flax import nnx as _flax_nnx

from jaxrank import _adapter
from jaxrank import _lagrangian
from jaxrank import _nnx_layers
from jaxrank import _tree
from jaxrank import _variables
from jaxrank import _wrap
from jaxrank import export as _export
from jaxrank._nnx_layers import AdaptedEinsum
from jaxrank._nnx_layers import AdaptedLinear
from jaxrank._nnx_layers import AdaptedLinearGeneral
from jaxrank._nnx_layers import Gate
from jaxrank._nnx_layers import LoRAGate
from jaxrank._nnx_checkpoint import restore_checkpoint
from jaxrank._nnx_checkpoint import save_checkpoint
from jaxrank._nnx_layers import rngs
from jaxrank._nnx_train import fit
from jaxrank._nnx_train import NnxTrainResult
from jaxrank._nnx_train import setup
from jaxrank._nnx_train import Training
from jaxrank._tree import from_linen_view
from jaxrank._tree import to_linen_view

# The trainable state of an adapted model: factors and gates (never the base nnx.Param).
TRAINABLE = (_flax_nnx.LoRAParam, Gate)
# The frozen base: nnx.Param that is not a LoRAParam (LoRAParam subclasses Param).
BASE = _flax_nnx.All(_flax_nnx.Param, _flax_nnx.Not(_flax_nnx.LoRAParam))

__all__ = (
    "AdaptedEinsum", "AdaptedLinear", "AdaptedLinearGeneral", "add_lagrange_multiplier",
    "adapted_layers", "adapter_of", "BASE", "compact", "fit", "from_linen_variables",
    "from_linen_view", "Gate", "LoRAGate", "merge", "NnxTrainResult", "rank_pattern", "restore_checkpoint",
    "rngs", "save_checkpoint", "setup", "to_linen_variables", "to_linen_view", "Training",
    "TRAINABLE", "transform", "wrap",
)


def _module_paths(model: _flax_nnx.Module):
  for path, node in _flax_nnx.iter_graph(model):
    if isinstance(node, _flax_nnx.Module):
      yield tuple(str(p) for p in path), node


def adapted_layers(model: _flax_nnx.Module) -> dict[str, _flax_nnx.Module]:
  """Every adapted layer of ``model``, by ``/``-joined path, in path order."""
  return dict(sorted(("/".join(path), m) for path, m in _module_paths(model)
                     if _nnx_layers.is_adapted(m)))


def adapter_of(model: _flax_nnx.Module) -> _adapter.LoRA:
  """The adapter spec ``wrap`` put on ``model`` (a ``ValueError`` if it has none)."""
  specs = {m._jaxrank_adapter for m in adapted_layers(model).values()}
  if len(specs) != 1:
    raise ValueError("This NNX model has no jaxrank adapter (see jaxrank.nnx.wrap)."
                     if not specs else f"This NNX model mixes adapter specs: {specs}.")
  return specs.pop()


def wrap(model: _flax_nnx.Module, targets: _wrap.Targets = "all-linear",
         adapter: Optional[_adapter.LoRA] = None, *,
         rngs: _flax_nnx.Rngs, gate_type: type = Gate) -> _flax_nnx.Module:
  """Adapts every targeted linear layer of ``model`` in place and returns ``model``.

  Args:
    model: an ``nnx.Module`` (or a single ``nnx.Linear``, whose path is ``''``).
    targets: as in :func:`jaxrank.wrap`: ``"all-linear"`` (all but the output head
      ``lm_head``/``classifier``/``score``/``qa_outputs``), a list of names matching the end
      of a layer's ``/``-joined attribute path, or a regex over the whole path.
    adapter: an adapter spec (``jaxrank.LoRA()`` by default), e.g. ``jaxrank.SoRA(rank=8)``.
    rngs: the ``nnx.Rngs`` whose ``params`` stream initialises the factors and gates.
    gate_type: the Variable type of the gates: :class:`Gate`, or :class:`LoRAGate` (also an
      ``nnx.LoRAParam``) for a trainer that trains only ``wrt=nnx.LoRAParam``, such as
      tunix's ``PeftTrainer``.

  A base kernel's sharding metadata (``out_sharding``/``sharding_names``) carries over:
  ``A`` is sharded like the kernel's input axes, ``B`` like its output axes, the rank axis is
  replicated. Build the model inside the same mesh context as the base.
  """
  if not isinstance(model, _flax_nnx.Module):
    raise TypeError(f"jaxrank.nnx.wrap expects an nnx.Module, got {type(model).__name__}; "
                    "for a Linen module use jaxrank.wrap.")
  adapter = _adapter.LoRA() if adapter is None else adapter
  if not isinstance(adapter, _adapter.LoRA):
    raise TypeError(f"adapter must be a jaxrank adapter spec such as jaxrank.LoRA(), got {adapter!r}")
  if not (isinstance(gate_type, type) and issubclass(gate_type, Gate)):
    raise TypeError(f"gate_type must be jaxrank.nnx.Gate or a subclass (e.g. "
                    f"jaxrank.nnx.LoRAGate), got {gate_type!r}")
  matcher = _wrap.TargetMatcher(targets)
  linear, matched, chosen = [], set(), []
  for path, module in _module_paths(model):
    if not isinstance(module, _nnx_layers.LINEAR_TYPES):
      continue
    linear.append("/".join(path))
    patterns = matcher.matching_patterns(path)
    if patterns:
      matched.update(patterns)
      chosen.append(("/".join(path), module))
  missing = [p for p in matcher.patterns if p not in matched]
  if missing:
    listing = "\n  ".join(sorted(linear)) or "(none: no nnx.Linear/LinearGeneral/Einsum)"
    raise ValueError(
        f"jaxrank.nnx.wrap: target pattern(s) {missing} matched no linear layer. A name matches "
        "a path's last components (PEFT target_modules), a single string other than "
        f"'all-linear' is a regex over the whole path. The linear layers of this model are:\n  "
        f"{listing}")
  for path, module in chosen:
    _nnx_layers.adapt_layer(module, path, adapter, rngs, gate_type)
  return model


# --- the Linen view -------------------------------------------------------------------------
def to_linen_variables(model: _flax_nnx.Module) -> dict:
  """``{'params': base, 'lora': ..., 'gates': ...}`` of an adapted model (works under jit).

  Only ``nnx.Param`` (base), ``nnx.LoRAParam`` and :class:`Gate` variables are included.
  """
  base = to_linen_view(_flax_nnx.state(model, BASE))
  adapter = to_linen_view(_flax_nnx.state(model, TRAINABLE))
  return {**base, **adapter}


def from_linen_variables(model: _flax_nnx.Module, variables) -> _flax_nnx.Module:
  """Writes Linen-style ``variables`` (any of ``params``/``lora``/``gates``) into ``model``.

  Leaves that ``variables`` lacks are kept; the model's paths must mirror the Linen ones.
  """
  like = _flax_nnx.state(model, (_flax_nnx.Param, Gate))
  _flax_nnx.update(model, from_linen_view(_tree.plain(variables), like))
  return model


def transform(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` (any jaxrank method's transform) made to take and return NNX state trees.

  Params and updates are re-keyed to the Linen view before ``tx`` and back after, so the
  method finds its leaves by the same names; its state is the one it keeps on Linen.
  Extra args (ALoRA's ``validation_batch``) pass through; ALoRA's ``loss_fn`` receives the
  trainable Linen view (rebuild a model with :func:`from_linen_view` + ``nnx.merge``).
  """
  tx = optax.with_extra_args_support(tx)

  def init(params):
    return tx.init(to_linen_view(params))

  def update(updates, state, params=None, **extra_args):
    view_params = None if params is None else to_linen_view(params)
    new_updates, state = tx.update(to_linen_view(updates), state, view_params, **extra_args)
    return from_linen_view(new_updates, updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def add_lagrange_multiplier(model: _flax_nnx.Module, value: float = 0.0) -> _flax_nnx.Module:
  """SaLoRA's λ as ``model.gates.lagrange_multiplier`` (Linen view: ``gates/lagrange_multiplier``)."""
  view = _lagrangian.add_lagrange_multiplier({"gates": {}}, value)
  if not isinstance(getattr(model, "gates", None), _nnx_layers.Gates):
    model.gates = _nnx_layers.Gates()
  gate_type = _nnx_layers.gate_type_of(model)
  model.gates.lagrange_multiplier = gate_type(view["gates"][_lagrangian.LAGRANGE_MULTIPLIER])
  return model


# --- results, through the Linen functions -----------------------------------------------------
def rank_pattern(model: _flax_nnx.Module) -> dict:
  """The effective rank of every adapted layer (as :func:`jaxrank.rank_pattern`)."""
  return _variables.rank_pattern(adapter_of(model), to_linen_variables(model))


def merge(model: _flax_nnx.Module) -> dict:
  """The base params with every adapter folded in, as a nested dict of the NNX base paths.

  ``nnx.update(unadapted_model, jaxrank.nnx.merge(model))`` loads them into a plain model.
  """
  return _export.merge(adapter_of(model), to_linen_variables(model))


def compact(model: _flax_nnx.Module, *, alpha: Any = None):
  """``(plain_lora_model, rank_pattern)``: a copy of ``model`` with dead ranks dropped.

  Gates and scale are folded into ``B`` (see :func:`jaxrank.compact`); the copy holds a plain
  :class:`jaxrank.LoRA` and no gates, with factor shapes of each layer's live rank.
  """
  old_spec = adapter_of(model)
  spec, variables, pattern = _export.compact(old_spec, to_linen_variables(model), alpha=alpha)
  new_model = _flax_nnx.clone(model)
  for path, layer in adapted_layers(new_model).items():
    factors = variables["lora"]
    for name in _tree.key_tuple(path):
      factors = factors[name]
    old = layer.lora
    layer.lora = _nnx_layers.Factors()
    for name, old_name in ((spec.down_name, old_spec.down_name), (spec.up_name, old_spec.up_name)):
      metadata = {k: v for k, v in getattr(old, old_name).get_metadata().items()
                  if k in ("out_sharding", "eager_sharding")}
      setattr(layer.lora, name, _flax_nnx.LoRAParam(factors[name], **metadata))
    layer.gates = _nnx_layers.Gates()
    layer._jaxrank_adapter = spec
  return new_model, pattern
