"""Flax ``params`` under their PyTorch (Hugging Face) names and layouts.

The rule transformers' own Flax<->PyTorch converter follows: the path joined by ``.``; a Dense
``kernel`` ``(in, out)`` becomes ``weight`` ``(out, in)``; a LayerNorm/RMSNorm ``scale``
and an ``nn.Embed`` ``embedding`` become ``weight`` unchanged; ``bias`` and leaves already
called ``weight`` (transformers' Flax RMSNorm) keep their name.

Example:
  >>> import numpy as np
  >>> from jaxrank import _torch_layout
  >>> params = {"encoder": {"dense": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)},
  ...                       "LayerNorm": {"scale": np.ones(2)}}}
  >>> {k: v.shape for k, v in _torch_layout.torch_tensors(params, "encoder").items()}
  {'dense.weight': (2, 3), 'dense.bias': (2,), 'LayerNorm.weight': (2,)}
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from jaxrank import _tree

TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
              "weight": "weight"}


def torch_name(path: tuple) -> str:
  """The PyTorch name of the Flax leaf at ``path`` (a tuple of keys)."""
  if path[-1] not in TORCH_LEAF:
    raise ValueError(f"params/{'/'.join(path)} has no PyTorch name (known leaves: "
                     f"{', '.join(TORCH_LEAF)}).")
  return ".".join(path[:-1] + (TORCH_LEAF[path[-1]],))


def torch_tensors(params, under: str = "") -> dict:
  """``{torch_name: float32 array}`` of every leaf of ``params`` under the Flax path ``under``
  (``a/b``; ``""``: all), named relative to it.

  Raises:
    ValueError: when nothing lies under ``under``, for a leaf with no PyTorch name, or for a
      ``kernel`` that is not 2-D (only ``nn.Dense`` maps onto ``torch.nn.Linear``).
  """
  key = _tree.key_tuple(under) if under else ()
  flat = {k[len(key):]: v for k, v in traverse_util.flatten_dict(_tree.plain(params)).items()
          if k[:len(key)] == key}
  if not flat:
    raise ValueError(f"params/{under} does not exist; pass the Flax path of a trained layer "
                     "(e.g. 'classifier' or 'bert/pooler/dense').")
  out = {}
  for rest, value in flat.items():
    value = np.asarray(value, np.float32)
    if rest[-1] == "kernel":
      if value.ndim != 2:
        raise ValueError(f"params/{'/'.join(key + rest)} is {value.ndim}-D; only 2-D nn.Dense "
                         "kernels map onto torch.nn.Linear.")
      value = value.T
    out[torch_name(rest)] = np.ascontiguousarray(value)
  return out
