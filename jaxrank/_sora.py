"""SoRA (Ding et al., 2023): gated LoRA and the proximal gate step.

A SoRA layer computes (eq. 6-9)::

    z = scale * W_u (g ⊙ (W_d x))

with a gate ``g`` of length ``r_max`` kept in the ``gates`` collection. The factors are
trained by any optax optimizer; the gate is updated by a proximal gradient step (eq. 10)::

    g_{t+1} = T_{η_t·λ}(g_t − η_t ∇_g L_0)

where ``T_ξ`` is the soft-threshold of eq. 11. :func:`sora_prox` is the proximal part as an
optax transform: placed *last* in a chain it turns the chain's update ``u_t`` of every gate leaf
into ``T_{η_t·λ}(g_t + u_t) − g_t``, so after ``optax.apply_updates`` the gate is exactly
``T_{η_t·λ}(g_t + u_t)`` (a gate the threshold zeroes becomes exactly 0.0). Every other leaf
passes through unchanged.

Which inner step the gate gets is up to the chain in front of the prox:

* the paper's rule is plain SGD on the gate, ``u_t = −η_t ∇_g L_0``;
  :func:`sora_optimizer` builds exactly that (``optax.sgd`` on the gates, your optimizer on the
  factors, nothing on the frozen ``params``);
* in ``optax.chain(optax.adamw(lr), sora_prox(lam, lr))`` the gate's ``u_t`` is AdamW's update
  (moments, bias correction *and* weight decay). This is a valid proximal step on the gate but
  the threshold ``η_t·λ`` is then measured in units of Adam steps (about ``η_t`` each), so
  ``λ`` of order 1 zeroes gates whose normalised gradient stays below ``λ``.

``compat="official"`` reproduces the official code (TsinghuaC3I/SoRA, ``SparseAdamW``) instead:
a constant threshold ``ξ = lam`` not scaled by the learning rate, applied after an Adam step as
three sequential masked assignments (which is *not* ``T_ξ``: values with ``ξ < |g| < 2ξ`` become
0 and ``|g| = ξ`` survives), plus an L1 term on the gates in the loss
(:func:`sora_l1_penalty` with ``reduction="mean"``). ``sora_optimizer(..., compat="official")``
assembles the whole official recipe.

After training, ``jaxrank.compact(model, variables)`` drops the zero-gate ranks and folds ``g``
into ``W_u`` (post-pruning, eq. 12): a plain LoRA whose rank per layer is ``nnz(g)``.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> import jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.SoRA(rank=3))
  >>> variables = model.init(jax.random.key(0), jnp.ones((2, 5)))
  >>> frozen, trainable = jaxrank.split_variables(variables)
  >>> tx = optax.chain(optax.adamw(0.1), jaxrank.sora_prox(lam=5.0, learning_rate=0.1))
  >>> state = tx.init(trainable)
  >>> grads = jax.tree.map(jnp.ones_like, trainable)
  >>> updates, state = tx.update(grads, state, trainable)
  >>> trainable = optax.apply_updates(trainable, updates)
  >>> trainable["gates"]["g"].tolist()   # T_{0.5}(1 - 0.1 - 0.1·1e-4·1) = 0.39999
  [0.39999..., 0.39999..., 0.39999...]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrank import _adapter
from jaxrank import _nonfinite
from jaxrank import _runtime_errors
from jaxrank import _tree
from jaxrank import _variables

Array = jax.Array
ScalarOrSchedule = Union[float, jax.typing.ArrayLike, optax.Schedule]

GATE_COLLECTION = "gates"
GATE_NAME = "g"
COMPAT_MODES = (None, "official")


# --- the adapter ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SoRA(_adapter.LoRA):
  """SoRA adapter spec: LoRA factors plus a gate ``g`` of length ``rank`` (eq. 7).

  ``A`` (``W_d``) and ``B`` (``W_u``) start as in :class:`jaxrank.LoRA` (kaiming-uniform and
  zeros, as in the official ``LowRankLinear``), so the adapted model equals the base model at
  initialisation whatever the gate.

  Attributes:
    gate_init: ``"ones"`` (default: every rank starts fully open, the paper does not pin it)
      or ``"normal"`` (standard normal, as ``torch.randn(1, r)`` in the official code).

  Example:
    >>> import jaxrank
    >>> import jax
    >>> jaxrank.SoRA(rank=4).init_gates(jax.random.key(0))["g"].tolist()
    [1.0, 1.0, 1.0, 1.0]
  """

  gate_init: str = "ones"

  gate_names: ClassVar[tuple[str, ...]] = (GATE_NAME,)

  def __post_init__(self):
    super().__post_init__()
    if self.gate_init not in ("ones", "normal"):
      raise ValueError(f"gate_init must be 'ones' or 'normal', got {self.gate_init!r}.")

  def init_gates(self, rng: Array) -> dict[str, Array]:
    if self.gate_init == "ones":
      return {GATE_NAME: jnp.ones((self.rank,), self.param_dtype)}
    return {GATE_NAME: jax.random.normal(rng, (self.rank,), self.param_dtype)}

  def gate(self, gates: Mapping[str, Array], rng_for) -> Array:
    del rng_for
    return gates[GATE_NAME]  # eq. 7: h' = g ⊙ h

  def rank_mask(self, gates: Mapping[str, Array]) -> Array:
    return gates[GATE_NAME] != 0  # eq. 12: rank i is dead iff g_i = 0


# --- thresholding operators -------------------------------------------------------------------
def soft_threshold(x: Array, threshold: jax.typing.ArrayLike) -> Array:
  """``T_ξ(x)`` of eq. 11: ``x − ξ`` if ``x > ξ``, ``x + ξ`` if ``x ≤ −ξ``, else 0.

  >>> import jax.numpy as jnp
  >>> soft_threshold(jnp.array([-3.0, -1.0, 0.5, 2.0]), 1.0).tolist()
  [-2.0, 0.0, 0.0, 1.0]
  """
  x = jnp.asarray(x)
  threshold = jnp.asarray(threshold, x.dtype)
  return jnp.where(x > threshold, x - threshold,
                   jnp.where(x <= -threshold, x + threshold, jnp.zeros_like(x)))  # eq. 11


def sora_official_threshold(x: Array, xi: jax.typing.ArrayLike) -> Array:
  """The official code's three sequential masked assignments (methods.md §2.3).

  ``p[p > ξ] -= ξ; p[p < −ξ] += ξ; p[|p| < ξ] = 0`` run one after another, so values with
  ``ξ < |x| < 2ξ`` end at 0 and ``|x| = ξ`` survives unchanged.

  >>> import jax.numpy as jnp
  >>> sora_official_threshold(jnp.array([-3.0, -1.5, -1.0, 1.5, 2.0, 3.0]), 1.0).tolist()
  [-2.0, 0.0, -1.0, 0.0, 1.0, 2.0]
  """
  x = jnp.asarray(x)
  xi = jnp.asarray(xi, x.dtype)
  x = jnp.where(x > xi, x - xi, x)
  x = jnp.where(x < -xi, x + xi, x)
  return jnp.where(jnp.abs(x) < xi, jnp.zeros_like(x), x)


# --- finding the gates in a tree --------------------------------------------------------------
def _no_gates_error(what: str, collection: Optional[str], gate_name: str) -> ValueError:
  where = f"{collection}/.../{gate_name}" if collection else f".../{gate_name}"
  return ValueError(
      f"{what} found no SoRA gate leaves ({where}) in the tree it was given. Pass the "
      "trainable variables {'lora': ..., 'gates': ...} (or the full variables) of a model "
      "wrapped with adapter=jaxrank.SoRA(...); for a tree that holds only the gates "
      "collection use collection=None."
  )


def _value(hyper: ScalarOrSchedule, count: Array) -> Array:
  return hyper(count) if callable(hyper) else jnp.asarray(hyper)


# --- the proximal transform ---------------------------------------------------------------------
def _raise_if_misused(params, state, lam_t, learning_rate, collection, gate_name) -> None:
  """Loud errors for what only traced values show: a negative ``λ(t)`` or ``η_t``, and a gate
  that this transform set to 0 at the last step but is nonzero now (the prox was not last)."""
  _runtime_errors.raise_if(
      jnp.any(lam_t < 0), ValueError,
      "sora_prox: lam is {} at step {}; λ must be >= 0 at every step (a negative λ pushes "
      "gates away from zero). Fix the array or schedule given as lam.", lam_t, state.count)
  if learning_rate is not None:
    eta = _value(learning_rate, state.count)
    _runtime_errors.raise_if(
        jnp.any(eta < 0), ValueError,
        "sora_prox: learning_rate is {} at step {}; η_t must be >= 0 (it is the gate's step "
        "size in the threshold η_t·λ).", eta, state.count)
  gates = _tree.named_leaves(params, gate_name, collection)
  if len(state.last_gates) == len(gates):
    revived = [jnp.any((last == 0) & (g != 0)) for last, g in zip(state.last_gates, gates)]
    _runtime_errors.raise_if(
        jnp.any(jnp.stack(revived)) if revived else False, ValueError,
        "sora_prox must be the last transform of the chain, after the optimizer: "
        "optax.chain(optax.adamw(lr), jaxrank.sora_prox(lam, lr)). At step {} a gate it set "
        "to exactly 0 at the previous step is nonzero, so a transform after it rescaled its "
        "update (e.g. sora_prox placed before the optimizer).", state.count)


class SoraProxState(NamedTuple):
  """State of :func:`sora_prox`.

  Attributes:
    count: optimizer steps taken (for ``lam``/``learning_rate`` schedules).
    nonfinite_count: updates skipped because their input was not finite.
    last_gates: the gates this transform produced at its last step (tree order): a gate it
      set to exactly 0 must still be 0 at the next step, else a transform after it changed
      its update (``sora_prox`` placed before the optimizer) and the step raises.
  """

  count: chex.Array
  nonfinite_count: chex.Array
  last_gates: Any = ()


def sora_prox(
    lam: ScalarOrSchedule,
    learning_rate: Optional[ScalarOrSchedule] = None,
    *,
    compat: Optional[str] = None,
    collection: Optional[str] = GATE_COLLECTION,
    gate_name: str = GATE_NAME,
) -> optax.GradientTransformationExtraArgs:
  """The SoRA proximal gate step; place it last in an optax chain.

  For every gate leaf (path ``gates/.../g``) the incoming update ``u_t`` (what the chain in
  front computed, e.g. ``−η_t ∇_g L_0`` for SGD) becomes ``prox(g_t + u_t) − g_t`` so that the
  applied gate is ``g_{t+1} = prox(g_t + u_t)``; every other leaf is returned unchanged.

  * ``compat=None`` (the paper, eq. 10-11): ``prox = T_{η_t·λ}``, the exact soft-threshold
    with ``η_t = learning_rate(t)`` and ``λ = lam(t)``.
  * ``compat="official"`` (TsinghuaC3I/SoRA ``SparseAdamW``): ``prox`` = the sequential masks
    of :func:`sora_official_threshold` with the constant ``ξ = lam(t)``; ``learning_rate`` is
    not used (pass ``None``).

  ``t`` counts calls of ``update`` (optimizer steps: under ``optax.MultiSteps`` only the real
  steps), starting at 0 like ``optax.scale_by_learning_rate``.

  Args:
    lam: ``λ`` (paper) or ``ξ`` (official), a non-negative float or an optax schedule.
    learning_rate: ``η_t`` of eq. 10, a float or a schedule: the same step size the chain in
      front uses for the gates. Required when ``compat=None``.
    compat: ``None`` (paper) or ``"official"``.
    collection: the collection name that must appear in a gate leaf's path (``"gates"``), or
      ``None`` to treat every leaf named ``gate_name`` as a gate.
    gate_name: the gate leaf name (``"g"``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(0.5), sora_prox(lam=1.0, learning_rate=0.5))
    >>> params = {"gates": {"g": jnp.array([1.0, 0.2, -2.0])}}
    >>> grads = {"gates": {"g": jnp.array([0.0, 0.0, 1.0])}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["gates"]["g"].tolist()  # T_{0.5}(g − 0.5·grad)
    [0.5, 0.0, -2.0]
  """
  if compat not in COMPAT_MODES:
    raise ValueError(f"compat must be None (paper) or 'official', got {compat!r}.")
  if compat is None and learning_rate is None:
    raise ValueError(
        "sora_prox needs learning_rate (η_t of eq. 10: the gate's step size, a float or a "
        "schedule) because the paper's threshold is η_t·λ. For the official code's constant "
        "threshold use compat='official'."
    )
  for name, value in (("lam", lam), ("learning_rate", learning_rate)):
    if (value is not None and not callable(value) and not isinstance(value, jax.core.Tracer)
        and np.any(np.asarray(value) < 0)):
      raise ValueError(f"sora_prox: {name} must be non-negative, got {value!r}.")
  # negative values of a schedule (known only per step) raise inside the step

  def init_fn(params):
    if not _tree.named_leaves(params, gate_name, collection):
      raise _no_gates_error("sora_prox.init", collection, gate_name)
    gates = _tree.named_leaves(params, gate_name, collection)
    return SoraProxState(count=jnp.zeros([], jnp.int32), nonfinite_count=jnp.zeros([], jnp.int32),
                         last_gates=[jnp.asarray(g) for g in gates])

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "sora_prox needs the current parameters: call tx.update(updates, state, params) "
          "(the prox maps g_t + u_t, so it must see g_t)."
      )
    lam_t = _value(lam, state.count)
    _raise_if_misused(params, state, lam_t, learning_rate, collection, gate_name)
    if compat is None:
      threshold = _value(learning_rate, state.count) * lam_t  # ξ = η_t·λ (eq. 10)
      prox = soft_threshold
    else:
      threshold = lam_t  # constant ξ, not scaled by the learning rate (official code)
      prox = sora_official_threshold
    found, produced = [], []

    def leaf(path, update, param):
      if update is None or not _tree.is_named_leaf(path, gate_name, collection):
        return update
      found.append(path)
      stepped = param + update.astype(param.dtype)
      new_gate = prox(stepped, threshold)  # g_{t+1} = T_{η_t·λ}(g_t + u_t)  (eq. 10-11)
      produced.append(new_gate)
      return (new_gate - param).astype(update.dtype)

    new_updates = jax.tree_util.tree_map_with_path(
        leaf, updates, params, is_leaf=lambda x: x is None
    )
    if not found:
      raise _no_gates_error("sora_prox.update", collection, gate_name)
    return new_updates, state._replace(count=optax.safe_increment(state.count),
                                       last_gates=produced)

  # a non-finite update leaves every gate as it was (never a zero from NaN) and is counted
  return optax.GradientTransformationExtraArgs(init_fn, _nonfinite.skip_if_not_finite(update_fn))


def sora_l1_penalty(
    variables,
    *,
    reduction: str = "sum",
    collection: Optional[str] = GATE_COLLECTION,
    gate_name: str = GATE_NAME,
) -> Array:
  """``Σ|g|`` over every SoRA gate (``reduction="sum"``) or its mean over all gate entries.

  The paper needs no L1 term in the loss (the prox applies it). The official code adds
  ``sparse_lambda · mean|g|`` (``reduction="mean"``) to the loss *and* thresholds.

  >>> import jax.numpy as jnp
  >>> float(sora_l1_penalty({"gates": {"a": {"g": jnp.array([1.0, -2.0])}}}))
  3.0
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
  gates = _tree.named_leaves(variables, gate_name, collection)
  if not gates:
    raise _no_gates_error("sora_l1_penalty", collection, gate_name)
  total = sum(jnp.sum(jnp.abs(g.astype(jnp.float32))) for g in gates)
  if reduction == "mean":
    total = total / sum(g.size for g in gates)
  return total


def sora_optimizer(
    lora_optimizer: optax.GradientTransformation,
    lam: ScalarOrSchedule,
    gate_learning_rate: ScalarOrSchedule,
    *,
    compat: Optional[str] = None,
    max_grad_norm: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """A whole SoRA optimizer over ``{'params', 'lora', 'gates'}`` (or ``{'lora', 'gates'}``).

  * ``compat=None`` (paper, eq. 10): ``lora_optimizer`` on the factors; plain SGD with step
    ``gate_learning_rate`` followed by ``sora_prox(lam, gate_learning_rate)`` on the gates.
  * ``compat="official"``: the official recipe's gate optimizer, Adam (β 0.9/0.999, ε 1e-6,
    no weight decay) with ``gate_learning_rate`` followed by the constant-``ξ=lam`` masks; add
    ``lam1 * sora_l1_penalty(v, reduction="mean")`` to your loss yourself, and pass
    ``max_grad_norm=0.1`` for the official clipping of all gradients. (Adam's ε sits inside
    ``optax.adam``'s bias-corrected denominator ``sqrt(v̂) + ε``; transformers' AdamW uses
    ``sqrt(v) + ε`` and corrects the step size instead, a difference of order ε.)

  ``params`` always gets ``optax.set_to_zero()``. The whole optimizer is inside
  ``optax.apply_if_finite``: a step with a non-finite gradient changes nothing and is counted
  (:func:`jaxrank.nonfinite_total`).

  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(2), adapter=SoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> tx = sora_optimizer(optax.adamw(1e-2), lam=0.1, gate_learning_rate=1e-2)
  >>> state = tx.init(variables)
  """
  if compat not in COMPAT_MODES:
    raise ValueError(f"compat must be None (paper) or 'official', got {compat!r}.")
  if compat is None:
    gate_tx = optax.chain(
        optax.sgd(gate_learning_rate), sora_prox(lam, gate_learning_rate)
    )
  else:
    gate_tx = optax.chain(
        optax.adam(gate_learning_rate, b1=0.9, b2=0.999, eps=1e-6),
        sora_prox(lam, compat="official"),
    )
  tx = optax.partition(
      {"params": optax.set_to_zero(), "lora": lora_optimizer, GATE_COLLECTION: gate_tx},
      _variables.collection_labels,
  )
  if max_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  # a non-finite gradient changes nothing (factors, gates, moments) and is counted
  return optax.with_extra_args_support(
      optax.apply_if_finite(tx, max_consecutive_errors=_nonfinite.NEVER_GIVE_UP))
