"""From ``jaxrank finetune`` to predictions in PyTorch, per model family.

A tiny BERT classifier and a tiny LLaMA are made with transformers and saved the way
``save_pretrained`` does (config.json, model.safetensors, tokenizer files); ``jaxrank finetune
--model FOLDER --train data.csv`` trains them (the CLI entry point), then

* the exported PEFT adapter (``adapter/peft``) on the PyTorch model gives jaxrank's logits on
  the test split (1e-4), the same predictions, and for BERT the test accuracy jaxrank reported;
* ``jaxrank export`` writes the merged checkpoint; ``from_pretrained`` gives the same logits.

jaxrank's logits come from the wrapped model with the saved (compacted) factors, unmerged.
"""

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="install torch==2.13.0 and the 'parity' extra")
peft = pytest.importorskip("peft", reason="install the 'parity' extra (peft)")
transformers = pytest.importorskip("transformers", reason="install the 'hf' extra")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

import jax  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import jaxrank  # noqa: E402
from jaxrank import _adapter_export  # noqa: E402
from jaxrank import _local_models  # noqa: E402
from jaxrank import cli  # noqa: E402

MAX_LENGTH = 16
WORDS = [f"w{i}" for i in range(40)]
LABELS = ["alpha", "beta", "gamma"]


def _invoke(*args):
  result = CliRunner().invoke(cli.app, [str(a) for a in args])
  assert result.exit_code == 0, result.output + repr(result.exception)
  return result


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(list(rows[0]))
    writer.writerows([list(r.values()) for r in rows])


def _texts(rng, n, labelled):
  rows = []
  for _ in range(n):
    label = int(rng.integers(3))
    words = list(rng.choice(WORDS, 6))
    words.insert(int(rng.integers(6)), LABELS[label])
    rows.append({"text": " ".join(words), **({"label": LABELS[label]} if labelled else {})})
  return rows


def _data(folder, labelled):
  rng = np.random.default_rng(0)
  paths = {}
  for split, n in (("train", 96), ("validation", 24), ("test", 24)):
    paths[split] = folder / f"{split}.csv"
    _write_csv(paths[split], _texts(rng, n, labelled))
  return paths


def _tiny_bert(folder):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + LABELS + WORDS
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32, num_labels=len(LABELS))
  transformers.BertForSequenceClassification(config).save_pretrained(folder / "bert")
  tokenizer.save_pretrained(folder / "bert")
  return folder / "bert"


def _tiny_llama(folder):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + LABELS + WORDS)}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      bos_token_id=1, eos_token_id=2, pad_token_id=3)
  transformers.LlamaForCausalLM(config).save_pretrained(folder / "llama")
  tokenizer.save_pretrained(folder / "llama")
  return folder / "llama"


def _batch(model_dir, csv_path):
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH,
                    padding="max_length", return_tensors="np")
  labels = np.array([LABELS.index(r["label"]) for r in rows]) if "label" in rows[0] else None
  return {k: np.asarray(v, np.int32) for k, v in batch.items()}, labels


def _jaxrank_logits(model_dir, run, batch, family):
  """The trained model in jaxrank: the saved compacted factors and head, not merged."""
  saved = _adapter_export.load_adapter(run / "adapter")
  base = _local_models.load_local_model(model_dir, num_labels=len(LABELS) if family == "bert"
                                        else None)
  flat = dict(jax.tree_util.tree_flatten_with_path(base.params)[0])
  head = dict(jax.tree_util.tree_flatten_with_path(saved.head)[0])
  assert set(head) <= set(flat)
  params = jax.tree_util.tree_map_with_path(lambda p, x: head.get(p, x), base.params)
  model = jaxrank.wrap(base.module, targets=list(base.targets), adapter=saved.adapter)
  variables = {"params": params, "lora": saved.lora}
  ids, mask = batch["input_ids"], batch["attention_mask"]
  if family == "bert":
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    out = model.apply(variables, ids, mask, batch["token_type_ids"], positions, None,
                      deterministic=True, return_dict=False)
  else:
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    out = model.apply(variables, ids, mask, positions, deterministic=True, return_dict=False)
  return np.asarray(out[0])


def _torch_logits(pt_model, batch):
  inputs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
  with torch.no_grad():
    return pt_model.eval()(**inputs).logits.numpy()


def _check(logits, expected, mask):
  """Within 1e-4 and the same argmax; a causal LM on its real tokens only (what a padded
  position computes differs between the two attention implementations and scores nothing)."""
  keep = mask.astype(bool) if logits.ndim == 3 else slice(None)
  np.testing.assert_allclose(logits[keep], expected[keep], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(logits.argmax(-1)[keep], expected.argmax(-1)[keep])


@pytest.mark.slow  # a CLI fine-tune and an export: about a minute each on 2 busy cores
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_finetune_then_pytorch_gives_jaxrank_predictions(tmp_path, family):
  model_dir = (_tiny_bert if family == "bert" else _tiny_llama)(tmp_path)
  data = _data(tmp_path, labelled=family == "bert")
  run = tmp_path / "run"
  _invoke("finetune", "--model", model_dir, "--train", data["train"], "--validation",
          data["validation"], "--test", data["test"],
          *(["--label-field", "label"] if family == "bert" else []),
          "--method", "sora", "--rank", 4, "--budget-rank", 2, "--steps", 24, "--batch-size", 8,
          "--max-length", MAX_LENGTH, "--lr", "1e-2", "--eval-every", 0, "--no-progress",
          "--output-dir", run)
  config = json.loads((run / "adapter" / "peft" / "adapter_config.json").read_text())
  assert config["task_type"] == ("SEQ_CLS" if family == "bert" else "CAUSAL_LM")
  assert config["modules_to_save"] == (["classifier"] if family == "bert" else None)
  ranks = set(config["rank_pattern"].values())
  assert config["r"] == max(ranks) and config["lora_alpha"] == max(ranks)

  batch, labels = _batch(model_dir, data["test"])
  expected = _jaxrank_logits(model_dir, run, batch, family)
  auto = (transformers.AutoModelForSequenceClassification if family == "bert"
          else transformers.AutoModelForCausalLM)
  with_adapter = peft.PeftModel.from_pretrained(auto.from_pretrained(model_dir),
                                                run / "adapter" / "peft")
  adapter_logits = _torch_logits(with_adapter, batch)
  _check(adapter_logits, expected, batch["attention_mask"])
  if family == "bert":  # the accuracy jaxrank reported is PyTorch's
    reported = json.loads((run / "metrics.json").read_text())["final_metrics"]["test_accuracy"]
    assert float(np.mean(adapter_logits.argmax(-1) == labels)) == pytest.approx(reported, abs=1e-9)

  _invoke("export", run, "--model", model_dir, "--format", "hf", "--output-dir", tmp_path / "out")
  merged = auto.from_pretrained(tmp_path / "out" / "hf")
  assert type(merged).__name__ == ("BertForSequenceClassification" if family == "bert"
                                   else "LlamaForCausalLM")
  merged_batch, _ = _batch(tmp_path / "out" / "hf", data["test"])  # its copied tokenizer
  np.testing.assert_array_equal(merged_batch["input_ids"], batch["input_ids"])
  _check(_torch_logits(merged, batch), expected, batch["attention_mask"])


def test_export_errors_name_the_fix(tmp_path):
  result = CliRunner().invoke(cli.app, ["export", str(tmp_path), "--model", "minilm"])
  assert result.exit_code != 0 and "adapter" in result.output
  result = CliRunner().invoke(cli.app, ["export", str(tmp_path), "--format", "onnx"])
  assert result.exit_code != 0 and "--format must be" in result.output
