"""Rank heatmaps: learned rank per layer (rows) and matrix type (columns), like the papers' figures.

A rank pattern (``jaxrank.rank_pattern`` or ``TrainResult.rank_pattern``) maps adapter paths
such as ``bert/encoder/layer/3/attention/self/query`` to a rank. :func:`rank_grid` reads the
layer index (the number after ``layer``/``layers``/``h``/``blocks``) and the matrix type (the
rest of the path after the index) from each path; :func:`rank_heatmap` draws the grid with
matplotlib (Agg backend, no display needed) and writes a PNG.

Example:
  >>> from jaxrank import plots
  >>> pattern = {"enc/layer/0/attention/self/query": 2, "enc/layer/1/attention/self/query": 5,
  ...            "enc/layer/0/output/dense": 1}
  >>> layers, kinds, grid = plots.rank_grid(pattern)
  >>> layers, kinds, grid.tolist()
  ([0, 1], ['Wq', 'Wf2'], [[2.0, 1.0], [5.0, nan]])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h|blocks|block)/(\d+)/(.+)$")
# Short names in the papers' style; unknown matrix types keep their path.
SHORT_NAMES = {
    "attention/self/query": "Wq", "attention/self/key": "Wk", "attention/self/value": "Wv",
    "attention/output/dense": "Wo", "intermediate/dense": "Wf1", "output/dense": "Wf2",
    "self_attn/q_proj": "Wq", "self_attn/k_proj": "Wk", "self_attn/v_proj": "Wv",
    "self_attn/o_proj": "Wo", "mlp/gate_proj": "Wgate", "mlp/up_proj": "Wup",
    "mlp/down_proj": "Wdown",
}
_ORDER = ("Wq", "Wk", "Wv", "Wo", "Wf1", "Wf2", "Wgate", "Wup", "Wdown")


def rank_grid(pattern: Mapping[str, Union[int, list]]):
  """``(layers, matrix_types, grid)``; ``grid[i, j]`` is the rank (NaN where not adapted).

  Paths without a layer index go to a row ``-1``. Stacked (``nn.scan``) entries, given as a
  list per path, fill one row per stacked index.
  """
  cells = {}
  for path, rank in pattern.items():
    match = _LAYER.search(path)
    if isinstance(rank, (list, tuple, np.ndarray)):
      kind = SHORT_NAMES.get(path.split("/", 1)[-1], path)
      for i, r in enumerate(np.asarray(rank).reshape(-1)):
        cells[(i, kind)] = float(r)
      continue
    if match:
      layer, kind = int(match.group(1)), SHORT_NAMES.get(match.group(2), match.group(2))
    else:
      layer, kind = -1, path
    cells[(layer, kind)] = float(rank)
  layers = sorted({layer for layer, _ in cells})
  kinds = sorted({kind for _, kind in cells},
                 key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k))
  grid = np.full((len(layers), len(kinds)), np.nan)
  for (layer, kind), rank in cells.items():
    grid[layers.index(layer), kinds.index(kind)] = rank
  return layers, kinds, grid


def rank_heatmap(pattern: Mapping[str, Union[int, list]], path: Union[str, Path], *,
                 title: Optional[str] = None, max_rank: Optional[int] = None) -> Path:
  """Writes the rank heatmap of ``pattern`` to ``path`` (PNG) and returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers, kinds, grid = rank_grid(pattern)
  if grid.size == 0:
    raise ValueError("The rank pattern is empty: nothing to plot.")
  vmax = max_rank if max_rank is not None else max(1.0, float(np.nanmax(grid)))
  fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(kinds), 1.0 + 0.45 * len(layers)))
  image = ax.imshow(grid, cmap="YlGnBu", vmin=0, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(kinds)), kinds)
  ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
  ax.set_xlabel("matrix")
  ax.set_ylabel("layer")
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      if not np.isnan(grid[i, j]):
        ax.text(j, i, f"{grid[i, j]:g}", ha="center", va="center",
                color="white" if grid[i, j] > 0.6 * vmax else "black", fontsize=8)
  fig.colorbar(image, ax=ax, label="rank")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
