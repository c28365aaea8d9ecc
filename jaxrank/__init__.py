"""jaxrank: dynamic-rank LoRA for JAX/Flax.

The whole public API, on one screen. Method modules stay importable by name
(``from jaxrank.sora import soft_threshold``). The transforms ``jaxrank.adalora`` and
``jaxrank.alora`` shadow their modules' names on the package; their helpers stay reachable as
attributes (``jaxrank.adalora.rank_pattern_from_state``, ``jaxrank.alora.ablation_scores_naive``).
"""

from jaxrank import checkpoint
from jaxrank import salora
from jaxrank import sharding
from jaxrank import sora
from jaxrank._adapter import delta_kernel
from jaxrank._adapter import LoRA
from jaxrank._budget import budget_threshold
from jaxrank._budget import top_budget_masks
from jaxrank._regularizers import orthogonality_penalty
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
from jaxrank.adalora import AdaLoRA
from jaxrank.adalora import adalora
from jaxrank.adalora import AdaLoraState
from jaxrank.alora import ablation_scores
from jaxrank.alora import ALoRA
from jaxrank.alora import alora
from jaxrank.alora import alora_round
from jaxrank.alora import ALoRAState
from jaxrank.alora import prune_and_reallocate
from jaxrank.export import compact
from jaxrank.export import merge
from jaxrank.peft_io import load_peft_adapter
from jaxrank.peft_io import save_peft_adapter
from jaxrank.salora import lagrangian_ascent
from jaxrank.salora import SaLoRA
from jaxrank.sharding import adapter_partition_specs
from jaxrank.sharding import data_parallel_mesh
from jaxrank.sharding import variable_shardings
from jaxrank.sora import SoRA
from jaxrank.sora import sora_l1_penalty
from jaxrank.sora import sora_optimizer
from jaxrank.sora import sora_prox
from jaxrank.sora import sparsifying_scheduler

__version__ = "0.1.0"

__all__ = (
    "ablation_scores",
    "AdaLoRA",
    "adalora",
    "AdaLoraState",
    "Adapted",
    "adapter_layers",
    "adapter_partition_specs",
    "AdapterLayer",
    "ALoRA",
    "alora",
    "alora_round",
    "ALoRAState",
    "budget_threshold",
    "checkpoint",
    "collection_labels",
    "compact",
    "count_parameters",
    "data_parallel_mesh",
    "delta_kernel",
    "effective_parameter_count",
    "join_variables",
    "lagrangian_ascent",
    "load_peft_adapter",
    "LoRA",
    "merge",
    "orthogonality_penalty",
    "prune_and_reallocate",
    "rank_masks",
    "rank_pattern",
    "SaLoRA",
    "salora",
    "save_peft_adapter",
    "sharding",
    "SoRA",
    "sora",
    "sora_l1_penalty",
    "sora_optimizer",
    "sora_prox",
    "sparsifying_scheduler",
    "split_variables",
    "TargetMatcher",
    "top_budget_masks",
    "trainable_parameter_count",
    "variable_shardings",
    "wrap",
)
