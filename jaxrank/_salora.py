"""SaLoRA: hard-concrete L0 gates per rank, orthogonality, and a Lagrangian density budget.

SaLoRA (Hu et al., *Mathematics* 2023; literature review §3.1–3.4) writes every adapted matrix
as ``ΔW = B G A`` with a diagonal gate ``G = diag(g_1 … g_r)`` (eq. 5). Each gate is drawn
from the hard-concrete distribution with a trainable ``log θ`` (eq. 7)::

    u ~ U(0, 1)
    s = sigmoid((log(u / (1 - u)) + log θ) / τ) · (ζ - γ) + γ
    g = min(1, max(0, s))

and the number of open gates has the closed-form expectation (eq. 8)::

    E[||G||_0] = Σ_j sigmoid(log θ_j - τ log(-γ / ζ)).

The training objective (eq. 12) is ``task + β Σ R_orth(B, A) + λ (C(Θ) - b)²`` where
``R_orth`` is eq. 9 (:func:`jaxrank.orthogonality_penalty`), ``C(Θ)`` the expected density
(eq. 11, see :func:`salora_expected_density`) and ``b`` the target density. It is minimised over
``(A, B, log θ)`` and maximised over ``λ ≥ 0`` by projected gradient ascent
(:func:`lagrangian_ascent`); ``log θ`` and ``λ`` are optimised only for optimizer steps in
``[t_start, t_end)``.

Conventions of this implementation (the paper gives no code; see reference/methods.md §4):

* **One sample per batch.** The gate vector of a layer has shape ``(rank,)``: one ``u`` per rank
  per ``apply`` call, shared by every example in the batch (§3.2). Each adapted layer draws its
  own sample from the rng stream ``"hard_concrete"`` (``model.apply(..., rngs={"hard_concrete":
  key})``); without that stream the gate is deterministic.
* **Deterministic gate** (evaluation, merge, compact, rank counting) is Louizos et al.'s
  test-time estimator, the clipped stretched sigmoid of ``log θ`` (no noise, no temperature)::

      ĝ = min(1, max(0, sigmoid(log θ) · (ζ - γ) + γ)),    rank alive  ⇔  ĝ > 0.

* **Hardening** (:func:`salora_harden`) turns the learned ``log θ`` into exact 0/1 gates; by default
  it keeps the ranks most likely to be open (largest ``P(g > 0)``) globally, as many as bring
  the kept parameter fraction closest to the expected density ``C(Θ)`` reached by training.
  ``rule="layer"`` keeps ``round(E[||G_i||_0])`` ranks per layer (CoFi / FLOP evaluation rule),
  ``rule="threshold"`` keeps the ranks with ``ĝ > 0``. :func:`jaxrank.compact` of hardened
  variables is a plain LoRA computing the same function.
* **Where λ lives.** The Lagrange multiplier is a scalar leaf ``gates/lagrange_multiplier``
  at the root of the ``gates`` collection (:func:`add_lagrange_multiplier`), so
  :func:`jaxrank.split_variables` puts it in the trainable tree, the loss is differentiated
  with respect to it like any other leaf, and :func:`lagrangian_ascent` finds it by name. The
  wrapped model never reads it; :func:`jaxrank.compact` drops it.
* **Density.** Eq. 11 as transcribed sums ``E[||G_i||_0] (d_i + k_i) / (#B_i + #A_i)`` over the
  ``K`` matrices, which lies in ``[0, K]``, not ``[0, 1]``. The default (``form="parameters"``)
  reads it as the parameter-weighted density over the whole network,
  ``Σ_i E[||G_i||_0] (d_i + k_i) / Σ_i (#B_i + #A_i)`` in ``[0, 1]``; ``form="as_written"``
  computes the transcribed sum.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jaxrank
  >>> import jaxrank
  >>> model = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.SaLoRA(rank=4))
  >>> variables = jaxrank.add_lagrange_multiplier(model.init(jax.random.key(0), jnp.ones((1, 3))))
  >>> frozen, trainable = jaxrank.split_variables(variables)
  >>> def loss_fn(trainable, key):
  ...   v = jaxrank.join_variables(frozen, trainable)
  ...   y = model.apply(v, jnp.ones((2, 3)), rngs={"hard_concrete": key})
  ...   return jnp.mean(y ** 2) + jaxrank.salora_penalty(model, v, target_density=0.5)
  >>> tx = jaxrank.lagrangian_ascent(0.1, optax.adam(1e-2), t_start=0, t_end=10, total_steps=10)
  >>> state = tx.init(trainable)
  >>> grads = jax.grad(loss_fn)(trainable, jax.random.key(1))
  >>> updates, state = tx.update(grads, state, trainable)
  >>> trainable = optax.apply_updates(trainable, updates)
  >>> float(jaxrank.lagrange_multiplier(trainable)) > 0
  True
  >>> round(float(jaxrank.salora_expected_density(model, variables)), 3)
  0.99
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _adapter
from jaxrank import _regularizers
from jaxrank import _tree
from jaxrank._lagrangian import HARD_LOG_THETA
from jaxrank._lagrangian import LAGRANGE_MULTIPLIER
from jaxrank._lagrangian import LOSS_SCALE
from jaxrank._lagrangian import LOG_THETA

Array = jax.Array

HARD_CONCRETE_RNG = "hard_concrete"
# HARD_LOG_THETA (50), the |log θ| written by `harden` and the in-step hardening: sigmoid(±50)
# is exactly 1 / below γ's reach in float32, so the deterministic gate and P(g > 0) are 0 or 1.


@dataclasses.dataclass(frozen=True)
class SaLoRA(_adapter.LoRA):
  """SaLoRA adapter spec: LoRA with one hard-concrete gate per rank (eq. 5, 7).

  The ``gates`` collection holds ``log_theta`` (shape ``(rank,)``) per adapted layer.

  Attributes:
    temperature: τ of eq. 7 (default 2/3, Louizos et al. / CoFi).
    gamma: γ < 0, left end of the stretched interval (default -0.1).
    zeta: ζ > 1, right end of the stretched interval (default 1.1).
    init_log_theta: initial ``log θ`` of every gate. The default 3.0 starts every gate open:
      the deterministic gate is ``min(1, sigmoid(3)·1.2 - 0.1) = 1``, ``P(g > 0) ≈ 0.99`` and a
      sampled gate equals 1 with probability ``sigmoid(3 - τ log((1 - γ)/(ζ - 1))) ≈ 0.80``.
      (The hard-concrete literature's ``log θ ≈ 0`` starts with deterministic gates of 0.5.)
    rng_name: the rng stream the gates are sampled from (default ``"hard_concrete"``).

  Example:
    >>> import jaxrank
    >>> spec = jaxrank.SaLoRA(rank=4)
    >>> [round(float(p), 3) for p in spec.open_probability(jnp.array([-3.0, 0.0, 3.0]))]
    [0.198, 0.832, 0.99]
  """

  temperature: float = 2.0 / 3.0
  gamma: float = -0.1
  zeta: float = 1.1
  init_log_theta: float = 3.0
  rng_name: str = HARD_CONCRETE_RNG

  gate_names: ClassVar[tuple[str, ...]] = (LOG_THETA,)

  def __post_init__(self):
    super().__post_init__()
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")
    if not self.gamma < 0:
      raise ValueError(f"gamma must be < 0 (the stretch below 0), got {self.gamma!r}.")
    if not self.zeta > 1:
      raise ValueError(f"zeta must be > 1 (the stretch above 1), got {self.zeta!r}.")
    if not math.isfinite(self.init_log_theta):
      raise ValueError(f"init_log_theta must be finite, got {self.init_log_theta!r}.")

  def init_gates(self, rng: Array) -> dict[str, Array]:
    del rng
    return {LOG_THETA: jnp.full((self.rank,), self.init_log_theta, self.param_dtype)}

  # --- the hard-concrete distribution ----------------------------------------------------
  def stretch_and_clip(self, s: Array) -> Array:
    """``min(1, max(0, s · (ζ - γ) + γ))`` for ``s`` in (0, 1) (eq. 7, second line)."""
    return jnp.clip(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

  def sample(self, log_theta: Array, rng: Array) -> Array:
    """One hard-concrete gate per entry of ``log_theta`` (eq. 7)."""
    log_theta = jnp.asarray(log_theta)
    dtype = jnp.result_type(log_theta.dtype, jnp.float32)
    eps = jnp.finfo(dtype).eps
    u = jax.random.uniform(rng, log_theta.shape, dtype, eps, 1.0 - eps)
    logistic = jnp.log(u) - jnp.log1p(-u)
    s = jax.nn.sigmoid((logistic + log_theta) / self.temperature)  # eq. 7
    return self.stretch_and_clip(s)

  def open_probability(self, log_theta: Array) -> Array:
    """``P(g > 0) = sigmoid(log θ - τ log(-γ/ζ))`` per gate (eq. 8)."""
    shift = self.temperature * math.log(-self.gamma / self.zeta)
    return jax.nn.sigmoid(jnp.asarray(log_theta) - shift)  # eq. 8

  def deterministic_gate(self, log_theta: Array) -> Array:
    """Louizos et al.'s test-time gate ``min(1, max(0, sigmoid(log θ)(ζ - γ) + γ))``."""
    return self.stretch_and_clip(jax.nn.sigmoid(jnp.asarray(log_theta)))

  # --- the gate ---------------------------------------------------------------------------
  def gate(self, gates: Mapping[str, Array], rng_for) -> Array:
    rng = rng_for(self.rng_name)
    if rng is None:
      has = getattr(rng_for, "has", lambda name: False)
      if has("dropout"):  # a training call (Flax convention) that forgot the gate stream
        raise ValueError(
            f"SaLoRA: this apply passes a 'dropout' rng (training) but no {self.rng_name!r} "
            f"rng, so the hard-concrete gates would be deterministic and log θ would get no "
            f"task gradient. Pass rngs={{'dropout': key1, {self.rng_name!r}: key2}} while "
            f"training (jaxrank.train does); evaluate with neither.")
      return self.deterministic_gate(gates[LOG_THETA])
    return self.sample(gates[LOG_THETA], rng)

  def effective_gate(self, gates: Mapping[str, Array]) -> Array:
    return self.deterministic_gate(gates[LOG_THETA])

  def rank_mask(self, gates: Mapping[str, Array]) -> Array:
    return self.effective_gate(gates) > 0


def _salora_spec(model) -> SaLoRA:
  spec = _tree.adapter_spec(model)
  if not isinstance(spec, SaLoRA):
    raise TypeError(
        f"Expected a model wrapped with jaxrank.SaLoRA(...), got {type(spec).__name__}."
    )
  return spec


# --- loss helpers ---------------------------------------------------------------------------
def salora_expected_l0(model, variables) -> dict[str, Array]:
  """``E[||G||_0]`` per adapted layer, by path (eq. 8); shape ``stack`` for nn.scan layers."""
  spec = _salora_spec(model)
  return {
      path: jnp.sum(spec.open_probability(layer.gates[LOG_THETA]), axis=-1)
      for path, layer in _tree.adapter_layers(spec, variables).items()
  }


def _rank_weight(layer: _tree.AdapterLayer) -> int:
  """``d_i + k_i``: the scalars one rank of this layer costs in ``A`` and ``B``."""
  return int(np.prod(layer.in_shape)) + int(np.prod(layer.out_shape))


def _check_form(form: str):
  if form not in ("parameters", "as_written"):
    raise ValueError(f"form must be 'parameters' or 'as_written', got {form!r}.")


def salora_expected_density(model, variables, *, form: str = "parameters") -> Array:
  """The expected density ``C(Θ)`` (eq. 11), differentiable in ``log θ``.

  Args:
    model: the wrapped model (or its :class:`SaLoRA` spec).
    variables: its variables (``lora`` and ``gates``; ``params`` optional).
    form: ``"parameters"`` (default): ``Σ_i E[||G_i||_0] (d_i + k_i) / Σ_i r_i (d_i + k_i)``,
      the expected fraction of adapter parameters kept, in [0, 1]. ``"as_written"``: eq. 11 as
      transcribed, ``Σ_i E[||G_i||_0] (d_i + k_i) / (#B_i + #A_i) = Σ_i E[||G_i||_0] / r_i``,
      in [0, K] for K adapted matrices (stacked nn.scan copies count as matrices).
  """
  _check_form(form)
  spec = _salora_spec(model)
  kept = jnp.zeros((), jnp.float32)
  total = 0.0
  for layer in _tree.adapter_layers(spec, variables).values():
    log_theta = layer.gates[LOG_THETA]
    weight = _rank_weight(layer)
    l0 = jnp.sum(spec.open_probability(log_theta), axis=-1)  # eq. 8, per matrix
    rank = log_theta.shape[-1]
    if form == "parameters":
      kept = kept + jnp.sum(l0) * weight
      total += log_theta.size * weight
    else:
      kept = kept + jnp.sum(l0 * weight / (rank * weight))  # eq. 11 as transcribed
  return kept / total if form == "parameters" else kept


def salora_density(model, variables) -> float:
  """The density of the deterministic (e.g. hardened) model: kept / all adapter parameters.

  A rank is kept when its deterministic gate is non-zero (``rank_mask``). After
  :func:`salora_harden` this equals :func:`salora_expected_density` (every ``P(g > 0)`` is 0 or 1).
  Not differentiable; for reporting.
  """
  spec = _salora_spec(model)
  masks = _tree.rank_masks(spec, variables)
  kept = total = 0
  for path, layer in _tree.adapter_layers(spec, variables).items():
    mask = np.asarray(masks[path])
    kept += int(mask.sum()) * _rank_weight(layer)
    total += mask.size * _rank_weight(layer)
  return kept / total


def salora_lagrangian_term(expected_density_value, multiplier, target_density) -> Array:
  """``λ (C(Θ) - b)²`` (eq. 12)."""
  return multiplier * jnp.square(expected_density_value - target_density)  # eq. 12


def _check_target(target_density, upper: float):
  if isinstance(target_density, jax.core.Tracer):
    return
  try:
    b = float(target_density)
  except TypeError:
    return
  if not 0.0 < b <= upper:
    raise ValueError(
        f"target_density must be in (0, {upper:g}] (a fraction of the adapter parameters to "
        f"keep), got {target_density!r}."
    )


def salora_penalty(
    model,
    variables,
    *,
    target_density: Optional[jax.typing.ArrayLike],
    orthogonality_weight: jax.typing.ArrayLike = 0.1,
    form: str = "parameters",
    orthogonality_form: str = "paper",
) -> Array:
  """SaLoRA's additions to the task loss: ``β Σ R_orth(B_i, A_i) + λ (C(Θ) - b)²``.

  ``R_orth`` is eq. 9 (:func:`jaxrank.orthogonality_penalty`), ``C(Θ)`` is eq. 11
  (:func:`salora_expected_density`), ``λ`` is read from ``gates/lagrange_multiplier`` (see
  :func:`add_lagrange_multiplier`; without it a ``ValueError`` names the fix) and the sum is
  eq. 12 minus the task loss. With a ``gates/loss_scale`` leaf (:func:`salora_add_loss_scale`,
  jaxrank's normalisation) the sum is multiplied by that task-loss EMA ``L̄`` (no gradient).

  Args:
    model: the wrapped model.
    variables: full variables, or ``join_variables(frozen, trainable)``.
    target_density: ``b`` in (0, 1] (in (0, K] for ``form="as_written"``); ``None`` leaves
      the density constraint out (the orthogonality term alone, no multiplier needed).
    orthogonality_weight: β (the paper's value is not known; 0.1 as AdaLoRA's original code).
    form: the reading of eq. 11, see :func:`salora_expected_density`.
    orthogonality_form: ``"paper"`` (squared, summed) or ``"peft"``, see
      :func:`jaxrank.orthogonality_penalty`.
  """
  _check_form(form)
  spec = _salora_spec(model)
  upper = 1.0 if form == "parameters" else float(_tree.num_matrices(spec, variables))
  if target_density is not None:
    _check_target(target_density, upper)
  total = orthogonality_weight * _regularizers.orthogonality_penalty(
      spec, variables, form=orthogonality_form
  )  # eq. 9
  gates = variables.get("gates", {})
  if target_density is not None and LAGRANGE_MULTIPLIER not in gates:
    raise ValueError(
        f"salora_penalty: the variables have no gates/{LAGRANGE_MULTIPLIER}, so the density "
        f"constraint λ (C − b)² for target_density={target_density!r} would be silently "
        f"dropped. Add it before building the optimizer state: "
        f"variables = jaxrank.add_lagrange_multiplier(variables) (NNX: "
        f"jaxrank.nnx.add_lagrange_multiplier(model)); or pass target_density=None for the "
        f"orthogonality term alone.")
  if target_density is not None:
    c = salora_expected_density(spec, variables, form=form)
    total = total + salora_lagrangian_term(c, gates[LAGRANGE_MULTIPLIER], target_density)  # eq. 12
  if LOSS_SCALE in gates:
    # jaxrank's loss-relative form: L_task + L̄ (β R + λ (C − b)²), L̄ = EMA of L_task (no
    # gradient), so β and λ weigh the penalties against the relative task loss L_task / L̄
    total = total * jax.lax.stop_gradient(gates[LOSS_SCALE])
  return total


# --- after training ---------------------------------------------------------------------------
def salora_harden(model, variables, *, rule: str = "budget") -> dict:
  """Returns variables whose gates are exactly 0 or 1 (``log θ = ±50``).

  Args:
    model: the wrapped model.
    variables: its trained variables.
    rule: which ranks stay open.

      * ``"budget"`` (default): over all layers, keep the ranks with the largest ``P(g > 0)``
        (eq. 8), as many as bring the kept parameter fraction closest to the expected density
        ``C(Θ)`` (eq. 11, parameter-weighted) reached by training.
      * ``"layer"``: per adapted matrix keep the ``round(E[||G||_0])`` ranks with the largest
        ``log θ`` (the CoFi / FLOP evaluation rule).
      * ``"threshold"``: keep the ranks whose deterministic gate is non-zero (Louizos et al.).

  ``"threshold"`` can miss the budget when gates have not polarised: on the planted-rank toy
  (tests, examples/salora_toy.py) ``C(Θ)`` reached b = 0.25 within 0.002 while the ranks with
  a non-zero deterministic gate made up 0.16–0.22 of the parameters; ``"budget"`` gave 0.25.

  Returns:
    variables of the same structure (``lagrange_multiplier`` kept as is). Runs outside ``jit``.
    ``jaxrank.compact(model, hardened)`` then returns a plain LoRA of the kept ranks.
  """
  if rule not in ("budget", "layer", "threshold"):
    raise ValueError(f"rule must be 'budget', 'layer' or 'threshold', got {rule!r}.")
  spec = _salora_spec(model)
  layers = _tree.adapter_layers(spec, variables)
  keep: dict[str, np.ndarray] = {}
  if rule == "threshold":
    for path, layer in layers.items():
      keep[path] = np.asarray(spec.rank_mask(layer.gates))
  elif rule == "layer":
    for path, layer in layers.items():
      log_theta = np.asarray(layer.gates[LOG_THETA], np.float64)
      n_keep = np.rint(np.asarray(jnp.sum(spec.open_probability(log_theta), -1)))
      order = np.argsort(-log_theta, axis=-1, kind="stable")
      ranks = np.argsort(order, axis=-1)  # position of each gate in descending order
      keep[path] = ranks < n_keep[..., None]
  else:
    probs = {path: np.asarray(spec.open_probability(layer.gates[LOG_THETA]), np.float64)
             for path, layer in layers.items()}
    flat_probs = np.concatenate([p.reshape(-1) for p in probs.values()])
    weights = np.concatenate([np.full(probs[path].size, _rank_weight(layer), np.float64)
                              for path, layer in layers.items()])
    target = float(np.sum(flat_probs * weights) / np.sum(weights))  # C(Θ), eq. 11
    order = np.argsort(-flat_probs, kind="stable")
    fractions = np.concatenate([[0.0], np.cumsum(weights[order])]) / np.sum(weights)
    keep = _tree.top_k_masks(probs, int(np.argmin(np.abs(fractions - target))))
  return _tree.with_gate_values(variables, LOG_THETA, {
      path: np.where(mask, HARD_LOG_THETA, -HARD_LOG_THETA) for path, mask in keep.items()})

