"""The user's own labelled texts: CSV, JSON Lines and Parquet files, or columns in memory.

:func:`read_columns` reads the named columns of a local file with pyarrow (``.csv``,
``.jsonl``/``.json`` in JSON Lines form, ``.parquet``; the ``data`` extra). :func:`load_texts`
turns a file, a table with column access (a ``datasets.Dataset``, a pandas or polars
DataFrame, a pyarrow Table; jaxrank does not need the ``datasets`` package), a dict of columns
or a ``(texts, labels)`` pair into a :class:`Texts`: the texts, the labels as class ids and
the label names (strings or integers in the file; the names are their sorted distinct values,
kept in the exported config).
:func:`stratified_holdout` splits off a seeded, per-class fraction for validation when the user
has no validation file. Every bad input raises a ``ValueError`` that names the argument and
the fix, before anything is tokenised or trained.

Example:
  >>> from jaxrank import datafiles
  >>> data = datafiles.load_texts({"text": ["good", "bad", "fine"], "label": ["pos", "neg",
  ...                              "pos"]}, text_field="text", label_field="label")
  >>> data.labels.tolist(), data.label_names
  ([1, 0, 1], ('neg', 'pos'))
  >>> datafiles.load_texts({"text": ["a", "b"], "label": [1, 1]}, text_field="text",
  ...                      label_field="label")
  Traceback (most recent call last):
  ...
  ValueError: --label-field 'label' of the training data holds one class (1); a classifier needs at least two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json",
            ".parquet": "parquet", ".pq": "parquet"}


class Texts(NamedTuple):
  """Texts with optional class labels.

  Attributes:
    texts: one string per example.
    labels: int32 class ids (None for causal-LM text).
    label_names: ``label_names[i]`` is the file's value of class ``i`` (as a string).
  """

  texts: list
  labels: Optional[np.ndarray]
  label_names: Optional[tuple]

  def take(self, index) -> "Texts":
    """The rows ``index`` (an integer array), with the same label names."""
    labels = None if self.labels is None else self.labels[index]
    return Texts([self.texts[i] for i in index], labels, self.label_names)

  def __len__(self) -> int:
    return len(self.texts)


def file_format(path) -> str:
  """``"csv"``, ``"json"`` or ``"parquet"`` from the file's suffix."""
  suffix = Path(path).suffix.lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"{path}: unknown data file type {suffix or '(none)'!r}; use "
                     f"{', '.join(sorted(SUFFIXES))} (CSV, JSON Lines or Parquet).")
  return SUFFIXES[suffix]


def read_columns(path, fields: Sequence[str], *, option: str = "--train") -> dict:
  """``{field: list}`` of the named columns of a local CSV, JSON Lines or Parquet file.

  Raises ``ValueError`` (naming ``option``) for a missing or empty file, an unreadable one and
  a field that is not a column (the message lists the columns there are).
  """
  try:
    import pyarrow  # noqa: F401
  except ImportError:
    raise ImportError("reading data files needs pyarrow: pip install -e '.[data]' "
                      "(or pip install pyarrow).") from None
  path = Path(path).expanduser()
  if not path.is_file():
    raise ValueError(f"{option} {path}: no such file.")
  if path.stat().st_size == 0:
    raise ValueError(f"{option} {path}: the file is empty.")
  kind = file_format(path)
  try:
    table = _read_table(path, kind)
  except Exception as error:  # pyarrow's ArrowInvalid and friends: say which file and why
    raise ValueError(f"{option} {path}: cannot be read as {kind} ({error}).") from None
  if table.num_rows == 0:
    raise ValueError(f"{option} {path}: the file has no rows.")
  for field in fields:
    if field not in table.column_names:
      raise ValueError(f"{option} {path}: no column {field!r}; its columns are "
                       f"{', '.join(table.column_names)}. Pass the right --text-field / "
                       "--label-field.")
  return {field: table.column(field).to_pylist() for field in fields}


def _read_table(path: Path, kind: str):
  if kind == "parquet":
    import pyarrow.parquet as pq
    return pq.read_table(path)
  if kind == "json":
    import pyarrow.json as pj
    return pj.read_json(path)
  import pyarrow.csv as pc
  delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
  # every column as text: labels such as "01" or "1.0" stay what the user wrote
  return pc.read_csv(path, parse_options=pc.ParseOptions(delimiter=delimiter),
                     convert_options=pc.ConvertOptions(strings_can_be_null=False))


def _columns(source, fields: Sequence[str], option: str) -> dict:
  """The columns of any accepted source (file path, table, dict, (texts, labels))."""
  if isinstance(source, (str, os.PathLike)):
    return read_columns(source, fields, option=option)
  if isinstance(source, tuple) and len(source) in (1, 2):
    if len(source) < len(fields):
      raise ValueError(f"{option}: a (texts,) tuple has no labels; pass (texts, labels), or "
                       "label_field=None to train a causal LM on the texts.")
    return {field: _as_list(column, field, option) for field, column in zip(fields, source)}
  names = column_names(source)
  if isinstance(names, Mapping):  # datasets.DatasetDict: {split: [columns]}
    raise ValueError(f"{option}: a dataset of splits ({', '.join(map(str, names))}), not one "
                     "table; pass one split, e.g. train=ds['train'], "
                     "validation=ds['validation'].")
  if names is None or not hasattr(source, "__getitem__"):
    raise ValueError(
        f"{option}: expected a file path, a table with column access (a datasets.Dataset, a "
        f"pandas or polars DataFrame, a pyarrow Table: data[name] and column_names, columns "
        f"or keys()), a dict of columns or a (texts, labels) pair, got "
        f"{type(source).__module__}.{type(source).__name__}.")
  for field in fields:
    if field not in names:
      raise ValueError(f"{option}: no column {field!r}; its columns are "
                       f"{', '.join(map(str, names))}. Pass the right text_field / "
                       "label_field.")
  columns = {}
  for field in fields:
    try:
      column = source[field]
    except (KeyError, TypeError, IndexError, ValueError) as error:
      raise ValueError(f"{option}: {type(source).__name__}[{field!r}] does not give the "
                       f"column ({type(error).__name__}: {error}); pass a table with column "
                       "access, a dict of columns or a (texts, labels) pair.") from None
    columns[field] = _as_list(column, field, option)
  return columns


def column_names(source) -> Optional[Sequence]:
  """The column names of a table-like ``source``: ``column_names`` (``datasets.Dataset``,
  pyarrow; a dict of split names for a ``DatasetDict``), ``columns`` (pandas, polars) or
  ``keys()`` (dicts); None for anything else.

  >>> column_names({"text": [], "label": []}), column_names(["a", "b"])
  (['text', 'label'], None)
  """
  names = getattr(source, "column_names", None)
  if names is None:
    names = getattr(source, "columns", None)
  if names is None and callable(getattr(source, "keys", None)):
    names = source.keys()
  if names is None or isinstance(names, (str, bytes)):
    return None
  if isinstance(names, Mapping):
    return names
  try:
    return list(names)
  except TypeError:
    return None


def _as_list(column, field: str, option: str) -> list:
  """A column (list, tuple, numpy array, pandas/polars Series, pyarrow array,
  ``datasets`` column) as a list of Python values."""
  if isinstance(column, (str, bytes)):
    raise ValueError(f"{option}: column {field!r} is one string, not a column of values; "
                     "pass a list (one entry per example).")
  values = None
  for method in ("to_pylist", "tolist", "to_list"):  # pyarrow, numpy/pandas, polars
    if callable(getattr(column, method, None)):
      values = getattr(column, method)()
      break
  else:
    try:
      values = list(column)
    except TypeError:
      pass
  if not isinstance(values, list):
    raise ValueError(f"{option}: column {field!r} ({type(column).__name__}) is not a "
                     "sequence of values (one per example).")
  return values


def encode_labels(values: Sequence[Any], label_names: Optional[Sequence[str]] = None, *,
                  option: str = "--train", field: str = "label") -> tuple[np.ndarray, tuple]:
  """``(class ids, label names)``: names are the sorted distinct values (numbers sorted as
  numbers), unless ``label_names`` (the training split's) are given; then a value outside them
  is an error."""
  if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values):
    raise ValueError(f"--label-field {field!r} of {option} has empty labels; fill or drop "
                     "those rows.")
  keys = [str(v).strip() for v in values]
  if label_names is None:
    distinct = set(keys)
    numeric = all(_is_number(k) for k in distinct)
    label_names = tuple(sorted(distinct, key=(lambda k: (float(k), k)) if numeric else None))
    if len(label_names) < 2:
      raise ValueError(f"--label-field {field!r} of the training data holds one class "
                       f"({label_names[0] if label_names else 'none'}); a classifier needs at "
                       "least two.")
  index = {name: i for i, name in enumerate(label_names)}
  unknown = sorted(set(keys) - set(index))
  if unknown:
    raise ValueError(f"{option}: labels {', '.join(unknown[:5])} are not among the training "
                     f"labels ({', '.join(label_names)}).")
  return np.asarray([index[k] for k in keys], np.int32), tuple(label_names)


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def load_texts(source, *, text_field: str = "text", label_field: Optional[str] = None,
               label_names: Optional[Sequence[str]] = None,
               option: str = "--train") -> Texts:
  """A :class:`Texts` from a file path, a table, a dict of columns or a ``(texts, labels)``
  pair; ``label_field=None`` reads texts only (causal LM).

  A table is any object with column access: ``source[name]`` gives a column and
  ``column_names``, ``columns`` or ``keys()`` lists the names. That covers an in-memory
  ``datasets.Dataset`` (``Dataset.from_dict``, ``load_dataset(...)["train"]``; jaxrank does not
  import or need the ``datasets`` package), pandas and polars DataFrames and pyarrow Tables.
  A column is a list, tuple, numpy array, Series or Arrow array. A ``DatasetDict`` (several
  splits), a column name that is missing and any other object raise a ``ValueError`` that
  says what to pass instead.

  ``label_names`` (from the training split) fix the class ids of a validation or test split.
  ``option`` names the source in error messages (``--train``, ``--validation``, ``--test``).
  """
  fields = [text_field] + ([label_field] if label_field is not None else [])
  columns = _columns(source, fields, option)
  texts = ["" if t is None else str(t) for t in columns[text_field]]
  if not texts:
    raise ValueError(f"{option}: no rows.")
  if not any(t.strip() for t in texts):
    raise ValueError(f"{option}: every text of --text-field {text_field!r} is empty.")
  if label_field is None:
    return Texts(texts, None, None)
  labels = columns[label_field]
  if len(labels) != len(texts):
    raise ValueError(f"{option}: {len(texts)} texts but {len(labels)} labels.")
  ids, names = encode_labels(labels, label_names, option=option, field=label_field)
  return Texts(texts, ids, names)


def stratified_holdout(labels: Optional[np.ndarray], count: int, fraction: float,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(train rows, held-out rows)``: a seeded ``fraction`` of every class held out (at least
  one row of each class with two or more rows); without ``labels``, of all ``count`` rows.

  >>> train, held = stratified_holdout(np.array([0] * 8 + [1] * 2), 10, 0.25, seed=0)
  >>> len(train), len(held), sorted(np.array([0] * 8 + [1] * 2)[held].tolist())
  (7, 3, [0, 0, 1])
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"--validation-fraction must be in (0, 1), got {fraction}.")
  rng = np.random.default_rng(seed)
  groups = [np.arange(count)] if labels is None else [np.nonzero(labels == c)[0]
                                                      for c in np.unique(labels)]
  held = []
  for rows in groups:
    rows = rng.permutation(rows)
    take = int(round(fraction * len(rows)))
    take = min(max(take, 1 if len(rows) >= 2 else 0), len(rows) - 1)
    held.append(rows[:take])
  held = np.sort(np.concatenate(held)).astype(np.int64)
  train = np.setdiff1d(np.arange(count), held)
  if len(held) == 0 or len(train) == 0:
    raise ValueError(f"{count} rows are too few to hold out a validation fraction of "
                     f"{fraction}: pass --validation FILE.")
  return train, held
