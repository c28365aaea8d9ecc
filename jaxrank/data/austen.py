"""Jane Austen's six novels for language modelling, from Debian ``r-cran-janeaustenr`` (no R).

The Debian package stores the novels as an R lazy-load database
(``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}``): the ``.rdx`` index is a gzip'd
R serialization mapping each object to an ``(offset, length)`` in the ``.rdb``; each ``.rdb``
entry is a 4-byte big-endian length followed by a zlib stream of R serialization. The PyPI
package ``rdata`` parses those into character vectors, one line of text per element (empty
strings separate paragraphs). Public-domain text; packaging MIT.

**Set-up, once** (the project's set-up step, never training code): ``jaxrank setup-data`` (or
:func:`setup`) runs ``apt-get download r-cran-janeaustenr`` (or takes a ``.deb`` you already
have), ``dpkg -x`` it into a temporary folder, converts the six novels and writes
``<cache>/austen/<novel>.txt`` plus ``manifest.json``; ``<cache>`` is ``$JAXRANK_DATA`` or
``~/.cache/jaxrank``. :func:`load_austen` only reads those files and never downloads.

**The split** (fixed, no randomness): each novel's lines are cut into contiguous blocks, the
first 90 % to train, the next 5 % to validation, the last 5 % to test (rounded down at line
boundaries), so no passage is shared between splits.

Example (after ``jaxrank setup-data``):
  >>> from jaxrank.data import austen
  >>> novels = austen.load_austen()  # doctest: +SKIP
  >>> sorted(novels)[0], len(novels["emma"])  # doctest: +SKIP
  ('emma', 16235)
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np

DEB_PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
          "sensesensibility")
FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}


def cache_dir(path: Optional[Union[str, Path]] = None) -> Path:
  """``path``, else ``$JAXRANK_DATA``, else ``~/.cache/jaxrank``."""
  if path is not None:
    return Path(path)
  return Path(os.environ.get("JAXRANK_DATA", Path.home() / ".cache" / "jaxrank"))


def read_rdata_novels(rdata_dir: Union[str, Path]) -> dict[str, list[str]]:
  """Reads the six character vectors from an extracted ``.../janeaustenr/data`` folder."""
  import warnings
  import rdata
  rdata_dir = Path(rdata_dir)
  parse = lambda raw: rdata.conversion.convert(rdata.parser.parse_data(raw))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" (it is)
    index = parse(gzip.decompress((rdata_dir / "Rdata.rdx").read_bytes()))
    database = (rdata_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
      blob = database[int(offset):int(offset) + int(length)]
      (size,) = struct.unpack(">I", blob[:4])
      raw = zlib.decompress(blob[4:])
      if len(raw) != size:
        raise ValueError(f"{name}: expected {size} bytes of R serialization, got {len(raw)}")
      novels[str(name)] = [str(line) for line in parse(raw)]
  missing = set(NOVELS) - set(novels)
  if missing:
    raise ValueError(f"{rdata_dir} lacks {sorted(missing)}")
  return novels


def setup(cache: Optional[Union[str, Path]] = None, deb: Optional[Union[str, Path]] = None) -> Path:
  """Extracts the novels into ``<cache>/austen`` (idempotent) and returns that folder.

  Args:
    cache: the data cache (see :func:`cache_dir`).
    deb: a downloaded ``r-cran-janeaustenr_*.deb``; by default ``apt-get download`` fetches it.
  """
  target = cache_dir(cache) / "austen"
  if (target / "manifest.json").exists():
    return target
  for tool in ("dpkg",) + (() if deb else ("apt-get",)):
    if shutil.which(tool) is None:
      raise RuntimeError(f"setting up the Austen data needs `{tool}` (Debian/Ubuntu).")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if deb is None:
      download = ["apt-get", "download", DEB_PACKAGE]
      if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
        # A fresh machine may have no package lists yet: refresh them once and retry.
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(download, cwd=tmp, check=True, capture_output=True)
      debs = sorted(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
      if not debs:
        raise RuntimeError(f"`apt-get download {DEB_PACKAGE}` produced no .deb")
      deb = debs[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(tmp / "root")], check=True, capture_output=True)
    novels = read_rdata_novels(tmp / "root" / RDATA_DIR)
  target.mkdir(parents=True, exist_ok=True)
  for name, lines in novels.items():
    (target / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  manifest = {"source": f"Debian {DEB_PACKAGE} ({Path(deb).name})",
              "lines": {name: len(lines) for name, lines in novels.items()}}
  (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
  return target


def load_austen(cache: Optional[Union[str, Path]] = None) -> dict[str, list[str]]:
  """The six novels, ``{name: lines}``, from the cache written by :func:`setup`."""
  folder = cache_dir(cache) / "austen"
  if not (folder / "manifest.json").exists():
    raise FileNotFoundError(
        f"The Jane Austen novels are not set up in {folder}: run `jaxrank setup-data` once "
        "(it extracts Debian's r-cran-janeaustenr; needs apt-get and dpkg).")
  manifest = json.loads((folder / "manifest.json").read_text())
  novels = {}
  for name in NOVELS:
    lines = (folder / f"{name}.txt").read_text(encoding="utf-8").split("\n")[:-1]
    if len(lines) != manifest["lines"][name]:
      raise ValueError(f"{folder / name}.txt is damaged: rerun `jaxrank setup-data`.")
    novels[name] = lines
  return novels


def split_text(novels: dict[str, list[str]]) -> dict[str, str]:
  """``{'train', 'validation', 'test'}`` texts: contiguous 90/5/5 % blocks of every novel."""
  parts = {name: [] for name in FRACTIONS}
  for novel in NOVELS:
    lines = novels[novel]
    n_val, n_test = int(len(lines) * FRACTIONS["validation"]), int(len(lines) * FRACTIONS["test"])
    n_train = len(lines) - n_val - n_test
    parts["train"].append("\n".join(lines[:n_train]))
    parts["validation"].append("\n".join(lines[n_train:n_train + n_val]))
    parts["test"].append("\n".join(lines[n_train + n_val:]))
  return {name: "\n\n".join(texts) for name, texts in parts.items()}


def chunk_tokens(ids, max_length: int) -> dict[str, np.ndarray]:
  """Non-overlapping windows of ``max_length`` token ids (the remainder is dropped)."""
  ids = np.asarray(ids, np.int32)
  n = len(ids) // max_length
  windows = ids[: n * max_length].reshape(n, max_length)
  return {"input_ids": windows, "attention_mask": np.ones_like(windows)}


def load_austen_chunks(tokenizer, max_length: int = 128,
                       cache: Optional[Union[str, Path]] = None) -> dict[str, dict]:
  """Each split tokenised (``tokenizers.Tokenizer``) into windows of ``max_length`` tokens."""
  texts = split_text(load_austen(cache))
  return {name: chunk_tokens(tokenizer.encode(text).ids, max_length)
          for name, text in texts.items()}
