"""The SVD-truncation baseline: LoRA at capacity, one global singular-value cut, recovery.

Not a paper's method: the trivial way to reach a rank budget ``b`` (a total number of live
ranks over all adapted matrices), shown beside every method. Train plain LoRA at the capacity
rank ``r_max`` on every matrix, then at one optimizer step ``cut_step`` (inside the jitted
step) take the SVD of every layer's update::

    ΔW_i = scale · A_i diag(m_i) B_i = U_i diag(σ_i) V_iᵀ,       σ_i ∈ R^{r_max}

keep the ``b`` largest singular values over *all* layers (one global threshold: the
Eckart–Young cut of the concatenated spectra) and re-factor the survivors in balanced form::

    A_i ← U_i √(σ_i / scale) m_i,   B_i ← √(σ_i / scale) V_iᵀ m_i,   m_i = [σ_ij > threshold_b]

Shapes never change: a cut rank keeps zero factors and a 0 ``mask`` gate, and its updates are
masked out, so the following *recovery* steps fine-tune only the ``b`` survivors. At the cut
the inner optimizer's first moments are zeroed (they refer to the old, non-SVD basis); its
second moments and learning-rate schedule continue (:func:`jaxrank._orthogonalize.zero_first_moments`).

:class:`SVDTruncation` is the adapter (LoRA plus a 0/1 ``mask`` per rank in ``gates``);
:func:`svd_truncation` wraps the inner optimizer and performs the cut (:func:`svd_truncate`);
``jaxrank.compact`` then drops the masked ranks. Layers are found with :mod:`jaxrank._tree`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> spec = jaxrank.SVDTruncation(rank=3, alpha=6.0)
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=spec)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 6)))
  >>> frozen, trainable = jaxrank.split_variables(variables)
  >>> tx = jaxrank.svd_truncation(optax.adam(1e-2), budget=2, cut_step=0, scale=spec.scale)
  >>> state = tx.init(trainable)
  >>> grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), trainable)
  >>> updates, state = tx.update(grads, state, trainable)
  >>> trainable = optax.apply_updates(trainable, updates)
  >>> int(trainable["gates"]["mask"].sum())
  2
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxrank import _adapter
from jaxrank import _budget
from jaxrank import _nonfinite
from jaxrank import _orthogonalize
from jaxrank import _tree

Array = jax.Array
MASK = "mask"


@dataclasses.dataclass(frozen=True)
class SVDTruncation(_adapter.LoRA):
  """Plain LoRA with a 0/1 ``mask`` per rank in ``gates`` (all ones until the cut)."""

  gate_names: ClassVar[tuple[str, ...]] = (MASK,)

  def init_gates(self, rng: Array) -> dict[str, Array]:
    del rng
    return {MASK: jnp.ones((self.rank,), self.param_dtype)}

  def gate(self, gates: Mapping[str, Array], rng_for) -> Array:
    del rng_for
    return gates[MASK]

  def rank_mask(self, gates: Mapping[str, Array]) -> Array:
    return gates[MASK] != 0


class SvdTruncationState(NamedTuple):
  """The optimizer step count, the inner optimizer's state and the updates skipped because
  their input was not finite."""

  count: chex.Array
  inner_state: optax.OptState
  nonfinite_count: chex.Array


def _layers(tree):
  """``(leaves, layers)``: every ``lora/<path>/A|B`` with its ``gates/<path>/mask``."""
  leaves = _tree.leaves_by_key(tree)
  layers = _tree.find_layers(leaves, SVDTruncation.down_name, SVDTruncation.up_name, (MASK,))
  return leaves, [keys for keys in layers.values() if MASK in keys.gates]


def svd_truncate(tree, budget, scale: float):
  """The global singular-value cut of every layer in ``tree`` (``{'lora', 'gates', ...}``).

  Returns the tree with ``A``, ``B`` re-factored from the SVD of ``ΔW`` and the masks set so
  that exactly the ``budget`` largest singular values survive (ties at the threshold are
  dropped, see :func:`jaxrank.top_budget_masks`). Works under ``jit`` with a traced budget.
  """
  leaves, layers = _layers(tree)
  if not layers:
    raise ValueError("svd_truncate found no lora/<path>/A with a gates/<path>/mask leaf.")
  factors = []
  for keys in layers:
    down, up, mask = leaves[keys.down], leaves[keys.up], leaves[keys.gates[MASK]]
    if down.ndim != 2 or up.ndim != 2:
      raise ValueError("the SVD baseline supports 2-D factors (one matrix per layer) only.")
    rank = down.shape[-1]
    delta = scale * (down * mask) @ up  # ΔW_i = scale · A_i diag(m_i) B_i
    u, s, vt = jnp.linalg.svd(delta.astype(jnp.float32), full_matrices=False)
    missing = rank - s.shape[0]  # a capacity above min(d, k): those ranks are zero
    if missing > 0:
      u, s = jnp.pad(u, ((0, 0), (0, missing))), jnp.pad(s, (0, missing))
      vt = jnp.pad(vt, ((0, missing), (0, 0)))
    factors.append((u[:, :rank], s[:rank], vt[:rank]))
  keep = _budget.top_budget_masks([s for _, s, _ in factors], budget)  # one global threshold
  new = {}
  for keys, (u, s, vt), k in zip(layers, factors, keep):
    root = jnp.sqrt(s / scale) * k
    dtype = leaves[keys.down].dtype
    new[keys.down] = (u * root).astype(dtype)  # A ← U √(σ/scale) m
    new[keys.up] = (root[:, None] * vt).astype(dtype)  # B ← √(σ/scale) Vᵀ m
    new[keys.gates[MASK]] = k.astype(leaves[keys.gates[MASK]].dtype)
  return _tree.replace_leaves(tree, new)


def _mask_updates(updates, params):
  """Zeroes the masks' updates and the updates of every masked rank's factors."""
  leaves, layers = _layers(params)
  given = _tree.leaves_by_key(updates)
  new = {}
  for keys in layers:
    mask = leaves[keys.gates[MASK]]
    new[keys.down] = given[keys.down] * mask
    new[keys.up] = given[keys.up] * mask[:, None]
    new[keys.gates[MASK]] = jnp.zeros_like(given[keys.gates[MASK]])
  return _tree.replace_leaves(updates, new)


def svd_truncation(
    inner: optax.GradientTransformation,
    *,
    budget: jax.typing.ArrayLike,
    cut_step: jax.typing.ArrayLike,
    scale: float,
) -> optax.GradientTransformationExtraArgs:
  """LoRA trained by ``inner``; after optimizer step ``cut_step`` (0-based) the global cut.

  Args:
    inner: the optimizer of the factors (e.g. ``optax.adamw(schedule)``).
    budget: total live ranks after the cut (over all adapted matrices).
    cut_step: the optimizer step after which :func:`svd_truncate` runs (once).
    scale: the adapter's ``alpha / rank`` (``ΔW = scale · A B``).

  The tree must hold ``lora`` and ``gates`` (as ``jaxrank.split_variables`` gives, or the
  adapter part inside the reference loop's head partition).
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if not _layers(params)[1]:
      raise ValueError("svd_truncation needs lora/<path>/A and gates/<path>/mask leaves "
                       "(an SVDTruncation adapter).")
    return SvdTruncationState(jnp.zeros([], jnp.int32), inner.init(params),
                              jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("svd_truncation needs params: call tx.update(grads, state, params).")
    grads = _mask_updates(updates, params)
    inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    stepped = optax.apply_updates(params, _mask_updates(inner_updates, params))
    cut = state.count == cut_step
    new = jax.lax.cond(cut, lambda p: svd_truncate(p, budget, scale), lambda p: p, stepped)
    # jaxrank: the first moments refer to the old factor basis: zeroed (schedules continue)
    inner_state = _orthogonalize.zero_first_moments(inner_state, cut)
    new_updates = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new, params)
    return new_updates, SvdTruncationState(optax.safe_increment(state.count), inner_state,
                                           state.nonfinite_count)

  return optax.GradientTransformationExtraArgs(init_fn, _nonfinite.skip_if_not_finite(update_fn))
