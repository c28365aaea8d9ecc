"""jaxrank: dynamic-rank LoRA for JAX/Flax.

The whole public API, on one screen. As in optax, the implementation modules are private
(``jaxrank/_sora.py`` ...) and every public name is re-exported here, flat, with the method's
prefix where a bare name would be ambiguous (``salora_penalty``, ``adalora_rank_pattern``).
No public name is both a module and a function; the 0.1 spellings (``jaxrank.sora.X``,
``jaxrank.adalora.rank_pattern_from_state``) still work for one release and warn
(``jaxrank._deprecated``).
"""

import sys as _sys

from jaxrank import _deprecated
from jaxrank import checkpoint
from jaxrank import distributed
from jaxrank.checkpoint import CorruptCheckpointError
from jaxrank.checkpoint import CorruptCheckpointWarning
from jaxrank import nnx
from jaxrank import sharding
from jaxrank._adalora import adalora as _adalora_transform
from jaxrank._adalora import adalora_rank_pattern
from jaxrank._adalora import AdaLoRA
from jaxrank._adalora import AdaLoraState
from jaxrank._adalora import find_adalora_state
from jaxrank._adalora_budget import adalora_budget_schedule
from jaxrank._adapter import delta_kernel
from jaxrank._adapter import LoRA
from jaxrank._alora import ALoRA
from jaxrank._alora_reallocation import alora_reset_optimizer_state
from jaxrank._alora_reallocation import prune_and_reallocate
from jaxrank._alora_reallocation import Reallocation
from jaxrank._alora_reallocation import reallocation_plan
from jaxrank._alora_schedule import alora as _alora_transform
from jaxrank._alora_schedule import alora_check_schedule
from jaxrank._alora_schedule import alora_freeze_masks
from jaxrank._alora_schedule import alora_orthogonalize
from jaxrank._alora_schedule import alora_round
from jaxrank._alora_schedule import ALoRAState
from jaxrank._alora_scoring import ablation_scores
from jaxrank._alora_scoring import ablation_scores_naive
from jaxrank._budget import budget_threshold
from jaxrank._fit_checks import NonFiniteError
from jaxrank._budget import top_budget_masks
from jaxrank._lagrangian import add_lagrange_multiplier
from jaxrank._lagrangian import lagrange_multiplier
from jaxrank._lagrangian import lagrangian_ascent
from jaxrank._lagrangian import LagrangianAscentState
from jaxrank._lagrangian import salora_add_loss_scale
from jaxrank._lagrangian import UncheckedWindowWarning
from jaxrank._nonfinite import nonfinite_total
from jaxrank._regularizers import orthogonality_penalty
from jaxrank._salora import salora_density
from jaxrank._salora import salora_expected_density
from jaxrank._salora import salora_expected_l0
from jaxrank._salora import salora_harden
from jaxrank._salora import salora_lagrangian_term
from jaxrank._salora import salora_penalty
from jaxrank._salora import SaLoRA
from jaxrank._sora import soft_threshold
from jaxrank._sora import SoRA
from jaxrank._sora import sora_l1_penalty
from jaxrank._sora import sora_official_threshold
from jaxrank._sora import sora_optimizer
from jaxrank._sora import sora_prox
from jaxrank._sora import SoraProxState
from jaxrank._sora_budget import sora_budget
from jaxrank._sora_budget import sora_budget_schedule
from jaxrank._sora_budget import sora_orthogonalize
from jaxrank._sora_budget import SoraBudgetState
from jaxrank._sora_scheduler import sora_gate_sparsity
from jaxrank._sora_scheduler import sora_lambda_values
from jaxrank._sora_scheduler import SoraPhaseReport
from jaxrank._sora_scheduler import sparsifying_scheduler
from jaxrank._svd import svd_truncate
from jaxrank._svd import svd_truncation
from jaxrank._svd import SVDTruncation
from jaxrank._svd import SvdTruncationState
from jaxrank._tree import live_rank_total
from jaxrank._variables import adapter_layers
from jaxrank._variables import AdapterLayer
from jaxrank._variables import collection_labels
from jaxrank._variables import count_parameters
from jaxrank._variables import effective_parameter_count
from jaxrank._variables import join_variables
from jaxrank._variables import rank_masks
from jaxrank._variables import rank_pattern
from jaxrank._variables import split_variables
from jaxrank._variables import trainable_parameter_count
from jaxrank._wrap import Adapted
from jaxrank._wrap import TargetMatcher
from jaxrank._wrap import wrap
from jaxrank.export import compact
from jaxrank.export import merge
from jaxrank.peft_io import load_peft_adapter
from jaxrank._local_models import load_local_model
from jaxrank._local_models import LocalModel
from jaxrank.text_finetune import finetune_texts
from jaxrank.text_finetune import FineTuned
from jaxrank.peft_io import save_peft_adapter
from jaxrank._hf_checkpoint import save_hf_checkpoint
from jaxrank._gguf_export import save_gguf
from jaxrank.sharding import adapter_partition_specs
from jaxrank.sharding import data_parallel_mesh
from jaxrank.sharding import variable_shardings

# The transforms, which until 0.1 also carried their modules' contents: the old attribute
# spellings (``jaxrank.adalora.find_state``) and ``from jaxrank.adalora import ...`` still work
# for one release, with a DeprecationWarning (see jaxrank/_deprecated.py).
adalora = _deprecated.CallableNamespace(_adalora_transform, "jaxrank.adalora",
                                        "jaxrank._adalora", _deprecated.ADALORA)
alora = _deprecated.CallableNamespace(_alora_transform, "jaxrank.alora", "jaxrank._alora",
                                      _deprecated.ALORA)
_sys.modules["jaxrank.adalora"] = adalora
_sys.modules["jaxrank.alora"] = alora
# deprecated modules, imported so that ``jaxrank.sora.X`` keeps working (and warns)
from jaxrank import salora  # noqa: E402
from jaxrank import sora  # noqa: E402
# the recipes build on the names above (recipes.py reads them off ``jaxrank``)
from jaxrank import recipes  # noqa: E402
from jaxrank import tasks  # noqa: E402
from jaxrank._recipe import Recipe  # noqa: E402
from jaxrank._recipe import RecipeContext  # noqa: E402
from jaxrank.recipes import RECIPES  # noqa: E402
from jaxrank.recipes import recipe  # noqa: E402

__version__ = "0.1.0"

__all__ = (
    "ablation_scores",
    "ablation_scores_naive",
    "AdaLoRA",
    "adalora",
    "adalora_budget_schedule",
    "adalora_rank_pattern",
    "AdaLoraState",
    "Adapted",
    "adapter_layers",
    "adapter_partition_specs",
    "AdapterLayer",
    "add_lagrange_multiplier",
    "alora",
    "ALoRA",
    "alora_check_schedule",
    "alora_freeze_masks",
    "alora_orthogonalize",
    "alora_reset_optimizer_state",
    "alora_round",
    "ALoRAState",
    "budget_threshold",
    "checkpoint",
    "collection_labels",
    "compact",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "count_parameters",
    "data_parallel_mesh",
    "delta_kernel",
    "distributed",
    "effective_parameter_count",
    "find_adalora_state",
    "finetune_texts",
    "FineTuned",
    "join_variables",
    "lagrange_multiplier",
    "lagrangian_ascent",
    "LagrangianAscentState",
    "live_rank_total",
    "load_local_model",
    "load_peft_adapter",
    "LocalModel",
    "LoRA",
    "merge",
    "NonFiniteError",
    "nonfinite_total",
    "nnx",
    "orthogonality_penalty",
    "prune_and_reallocate",
    "rank_masks",
    "rank_pattern",
    "Reallocation",
    "reallocation_plan",
    "recipe",
    "Recipe",
    "RecipeContext",
    "recipes",
    "RECIPES",
    "SaLoRA",
    "salora_add_loss_scale",
    "salora_density",
    "salora_expected_density",
    "salora_expected_l0",
    "salora_harden",
    "salora_lagrangian_term",
    "salora_penalty",
    "save_gguf",
    "save_hf_checkpoint",
    "save_peft_adapter",
    "sharding",
    "soft_threshold",
    "SoRA",
    "sora_budget",
    "sora_budget_schedule",
    "sora_gate_sparsity",
    "sora_l1_penalty",
    "sora_lambda_values",
    "sora_official_threshold",
    "sora_optimizer",
    "sora_orthogonalize",
    "sora_prox",
    "SoraBudgetState",
    "SoraPhaseReport",
    "SoraProxState",
    "sparsifying_scheduler",
    "split_variables",
    "svd_truncate",
    "svd_truncation",
    "SVDTruncation",
    "SvdTruncationState",
    "TargetMatcher",
    "tasks",
    "top_budget_masks",
    "trainable_parameter_count",
    "UncheckedWindowWarning",
    "variable_shardings",
    "wrap",
)
