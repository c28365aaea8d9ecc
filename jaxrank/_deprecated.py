"""Old spellings, kept working for one release with a ``DeprecationWarning``.

Until 0.1 the methods lived in public modules (``jaxrank.sora``, ``jaxrank.salora``,
``jaxrank.adalora``, ``jaxrank.alora``) and ``jaxrank.adalora``/``jaxrank.alora`` were at the
same time the transforms, with the module contents hung onto the functions. Now, as in optax
(``optax.contrib.sam`` lives in ``optax/contrib/_sam.py``), the implementation modules are
private and every public name is re-exported flat from ``jaxrank``, with the method's prefix
where the bare name would be ambiguous (``jaxrank.salora_penalty``,
``jaxrank.adalora_rank_pattern``). No public name is both a module and a function.

The old spellings still work and warn: ``from jaxrank.sora import SoRA``,
``jaxrank.salora.penalty``, ``jaxrank.adalora.rank_pattern_from_state``,
``jaxrank.alora.ablation_scores_naive``. They are removed in jaxrank 0.2.

Example:
  >>> import warnings, jaxrank
  >>> with warnings.catch_warnings(record=True) as caught:
  ...   warnings.simplefilter("always")
  ...   old = jaxrank.adalora.rank_pattern_from_state
  >>> old is jaxrank.adalora_rank_pattern, caught[0].category.__name__
  (True, 'DeprecationWarning')
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, Mapping

# old attribute name -> new name on ``jaxrank`` (None: a constant of the private module)
SORA = {
    "SoRA": "SoRA", "soft_threshold": "soft_threshold",
    "official_threshold": "sora_official_threshold", "SoraProxState": "SoraProxState",
    "sora_prox": "sora_prox", "sora_l1_penalty": "sora_l1_penalty",
    "sora_optimizer": "sora_optimizer", "gate_sparsity": "sora_gate_sparsity",
    "lambda_values": "sora_lambda_values", "PhaseReport": "SoraPhaseReport",
    "sparsifying_scheduler": "sparsifying_scheduler", "GATE_NAME": None,
    "GATE_COLLECTION": None, "COMPAT_MODES": None,
}
SALORA = {
    "SaLoRA": "SaLoRA", "expected_l0": "salora_expected_l0",
    "expected_density": "salora_expected_density", "density": "salora_density",
    "lagrangian_term": "salora_lagrangian_term", "penalty": "salora_penalty",
    "add_lagrange_multiplier": "add_lagrange_multiplier",
    "lagrange_multiplier": "lagrange_multiplier",
    "LagrangianAscentState": "LagrangianAscentState", "lagrangian_ascent": "lagrangian_ascent",
    "harden": "salora_harden", "LOG_THETA": None, "LAGRANGE_MULTIPLIER": None,
    "HARD_CONCRETE_RNG": None, "HARD_LOG_THETA": None,
}
ADALORA = {
    "AdaLoRA": "AdaLoRA", "AdaLoraState": "AdaLoraState", "adalora": "adalora",
    "budget_schedule": "adalora_budget_schedule", "find_state": "find_adalora_state",
    "rank_pattern_from_state": "adalora_rank_pattern",
}
ALORA = {
    "ALoRA": "ALoRA", "ALoRAState": "ALoRAState", "alora": "alora",
    "Reallocation": "Reallocation", "ablation_scores": "ablation_scores",
    "ablation_scores_naive": "ablation_scores_naive", "alora_round": "alora_round",
    "check_schedule": "alora_check_schedule", "live_rank_total": "live_rank_total",
    "prune_and_reallocate": "prune_and_reallocate", "reallocation_plan": "reallocation_plan",
    "reset_optimizer_state": "alora_reset_optimizer_state", "MASK": None,
}


def _resolve(old_module: str, private_module: str, renames: Mapping[str, str], name: str):
  if name not in renames:
    raise AttributeError(
        f"{old_module!r} has no attribute {name!r} (and {old_module} is deprecated: the "
        "public names are on jaxrank itself)")
  new = renames[name]
  where = f"jaxrank.{new}" if new else f"{private_module}.{name}"
  warnings.warn(f"{old_module}.{name} is deprecated and goes away in jaxrank 0.2; use {where}.",
                DeprecationWarning, stacklevel=3)
  if new is None:
    return getattr(importlib.import_module(private_module), name)
  return getattr(importlib.import_module("jaxrank"), new)


def module_getattr(old_module: str, private_module: str,
                   renames: Mapping[str, str]) -> Callable[[str], object]:
  """A PEP 562 ``__getattr__`` for a deprecated module that forwards old names."""
  return functools.partial(_resolve, old_module, private_module, renames)


class CallableNamespace:
  """A transform that still answers the attributes of the module whose name it took.

  ``jaxrank.adalora(...)`` calls the transform; ``jaxrank.adalora.find_state`` warns and
  returns ``jaxrank.find_adalora_state``.
  """

  def __init__(self, function: Callable, old_module: str, private_module: str,
               renames: Mapping[str, str]):
    functools.update_wrapper(self, function)
    self._names = (old_module, private_module, renames)

  def __call__(self, *args, **kwargs):
    return self.__wrapped__(*args, **kwargs)

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    return _resolve(*self._names, name)

  def __repr__(self) -> str:
    return repr(self.__wrapped__)
