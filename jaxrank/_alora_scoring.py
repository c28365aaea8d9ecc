"""ALoRA's AB-LoRA rank importance (Liu et al., NAACL 2024, eq. 6), batched and naive.

For every live rank ``r`` of the whole network, on one fixed validation batch::

    IS(r) = S(M) - S(M∖r) + S(M_r),      S = -loss                                  (eq. 6)

``M`` is the network with its current gates, ``M∖r`` the same with rank ``r`` switched off and
``M_r`` the network with *only* rank ``r`` switched on. :func:`ablation_scores` evaluates the
``2R`` masked networks in vmapped chunks inside one compiled program;
:func:`ablation_scores_naive` is the reference Python loop of ``2R + 1`` forward passes.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> model = jaxrank.wrap(nn.Dense(2), adapter=jaxrank.ALoRA(rank=3, initial_rank=2))
  >>> v = model.init(jax.random.key(0), jnp.ones((4, 3)))
  >>> loss = lambda v, x: jnp.mean(model.apply(v, x) ** 2)
  >>> fast = jaxrank.ablation_scores(loss, model, v, jnp.ones((4, 3)))
  >>> slow = jaxrank.ablation_scores_naive(loss, model, v, jnp.ones((4, 3)))
  >>> bool(jnp.allclose(fast[""][:2], slow[""][:2], atol=1e-6))
  True
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _alora

Array = jax.Array


# --------------------------------------------------------------------------------------------
# AB-LoRA scores (eq. 6)
# --------------------------------------------------------------------------------------------


def scores_flat(loss_fn, slots: _alora.Slots, params, batch, chunk_size: int, max_live: int):
  flat = slots.flatten(slots.masks(params))
  n = flat.size
  live = flat != 0
  num_chunks = max(1, -(-max_live // chunk_size))
  padded = num_chunks * chunk_size
  # Indices of live slots (static length); the padding points past the end and is dropped.
  index = jnp.nonzero(live, size=padded, fill_value=n)[0]

  def loss_of(mask):
    return loss_fn(slots.with_gates(params, mask), batch)

  def pair(i):
    ablated = flat.at[i].set(0, mode="drop")  # M∖r
    gate_i = flat.at[i].get(mode="fill", fill_value=0)
    alone = jnp.zeros_like(flat).at[i].set(gate_i, mode="drop")  # M_r
    return jax.vmap(loss_of)(jnp.stack([ablated, alone]))

  losses = jax.lax.map(jax.vmap(pair), index.reshape(num_chunks, chunk_size))
  losses = losses.reshape(padded, 2)
  full = loss_of(flat)
  # IS(r) = S(M) - S(M∖r) + S(M_r) with S = -loss                                     (eq. 6)
  importance = -full + losses[:, 0] - losses[:, 1]
  scores = jnp.full((n,), jnp.nan, importance.dtype)
  return scores.at[index].set(importance, mode="drop"), full


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _scores_flat_jit(loss_fn, slots, params, batch, chunk_size, max_live):
  return scores_flat(loss_fn, slots, params, batch, chunk_size, max_live)


def _max_live(adapter: _alora.ALoRA, slots: _alora.Slots, params, max_live: Optional[int]) -> int:
  if max_live is not None:
    return int(max_live)
  flat = slots.flatten(slots.masks(params))
  if _alora.is_concrete(flat):
    return max(1, int(np.count_nonzero(np.asarray(flat))))
  # Traced: rounds never raise the live total above its initial value.
  return slots.num_modules * adapter.initial_rank


def ablation_scores(
    loss_fn: _alora.LossFn,
    model_or_adapter,
    params,
    batch,
    *,
    chunk_size: int = 32,
    max_live: Optional[int] = None,
) -> dict[str, Array]:
  """AB-LoRA importance (eq. 6) of every live rank, batched over gate masks.

  For each live slot ``r`` the two masks ``M∖r`` and ``M_r`` are built and their losses are
  evaluated ``2 * chunk_size`` masks per vmapped call, ``lax.map`` over chunks, so memory is
  bounded by one chunk's activations; one compiled program scores the whole network.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. cross-entropy on ``batch``. It receives
      ``params`` with the ``gates`` leaves replaced; ``S = -loss``.
    model_or_adapter: the model from ``jaxrank.wrap(..., adapter=ALoRA(...))`` or the spec.
    params: a dict holding ``lora`` and ``gates`` (trainable or full variables).
    batch: the fixed validation batch ``B_val``.
    chunk_size: slots scored per vmapped call (each slot costs two forward passes).
    max_live: the most live slots to score (static). By default, the live count of concrete
      ``params``, or ``num_modules * initial_rank`` under ``jit``.

  Returns:
    Per layer path, scores shaped like its mask; ``nan`` on dead slots.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
    >>> from jaxrank import ALoRA, ablation_scores
    >>> model = jaxrank.wrap(nn.Dense(2), adapter=ALoRA(rank=3, initial_rank=2))
    >>> v = model.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> loss = lambda v, x: jnp.mean(model.apply(v, x) ** 2)
    >>> scores = ablation_scores(loss, model, v, jnp.ones((4, 3)))
    >>> bool(jnp.isnan(scores[""][2])), scores[""].shape
    (True, (3,))
  """
  adapter = _alora.alora_spec(model_or_adapter)
  slots = _alora.Slots.of(adapter, params)
  limit = _max_live(adapter, slots, params, max_live)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  chunk_size = min(int(chunk_size), limit)
  leaves = jax.tree.leaves((params, batch))
  run = _scores_flat_jit if all(map(_alora.is_concrete, leaves)) else scores_flat
  scores, _ = run(loss_fn, slots, params, batch, chunk_size, limit)
  return slots.unflatten(scores)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss_with_gates_jit(loss_fn, slots, params, batch, flat_mask):
  return loss_fn(slots.with_gates(params, flat_mask), batch)


def ablation_scores_naive(loss_fn: _alora.LossFn, model_or_adapter, params,
                          batch) -> dict[str, Array]:
  """The same scores as :func:`ablation_scores` by a Python loop of ``2R + 1`` forward passes.

  For tests and benchmarks; needs concrete ``params``.
  """
  adapter = _alora.alora_spec(model_or_adapter)
  slots = _alora.Slots.of(adapter, params)
  flat = np.asarray(slots.flatten(slots.masks(params)))
  loss_of = functools.partial(_loss_with_gates_jit, loss_fn, slots)
  full = float(loss_of(params, batch, jnp.asarray(flat)))
  scores = np.full(flat.shape, np.nan, np.float32)
  for r in np.flatnonzero(flat):
    ablated = flat.copy()
    ablated[r] = 0
    alone = np.zeros_like(flat)
    alone[r] = flat[r]
    # IS(r) = S(M) - S(M∖r) + S(M_r), S = -loss                                          (eq. 6)
    scores[r] = (-full + float(loss_of(params, batch, jnp.asarray(ablated)))
                 - float(loss_of(params, batch, jnp.asarray(alone))))
  return slots.unflatten(jnp.asarray(scores))
