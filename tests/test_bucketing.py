"""Length bucketing: each batch padded to the smallest of a few lengths gives the same training
as fixed padding (the attention mask hides the padding), up to floating-point rounding."""

import dataclasses

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

import jax  # noqa: E402

from jaxrank import batching  # noqa: E402
from jaxrank import recipes  # noqa: E402
from jaxrank import train  # noqa: E402
from jaxrank.models import bert  # noqa: E402

MAX_LENGTH = 32


def _data(n=24, seed=0):
  """Right-padded token rows of 3 to 20 tokens, padded to 32 (batches fall in 16 or 24)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 21, size=n)
  ids = np.zeros((n, MAX_LENGTH), np.int32)
  mask = np.zeros((n, MAX_LENGTH), np.int32)
  for i, length in enumerate(lengths):
    ids[i, :length] = rng.integers(5, 60, size=length)
    mask[i, :length] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "labels": rng.integers(0, 2, size=n).astype(np.int32)}


def test_trim_to_bucket_cuts_only_padding():
  data = _data()
  batch = {k: v[:8] for k, v in data.items()}
  cut = batching.trim_to_bucket(batch, batching.bucket_lengths(MAX_LENGTH))
  longest = int(batch["attention_mask"].sum(1).max())
  assert cut["input_ids"].shape[1] == min(n for n in (16, 24, 32) if n >= longest) < MAX_LENGTH
  assert cut["labels"].shape == (8,)
  assert batch["attention_mask"][:, cut["input_ids"].shape[1]:].sum() == 0  # only padding cut
  np.testing.assert_array_equal(cut["input_ids"], batch["input_ids"][:, :cut["input_ids"].shape[1]])


def test_bucketed_and_fixed_padding_train_to_the_same_variables():
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=MAX_LENGTH, num_labels=2,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout off
  hf = transformers.FlaxBertForSequenceClassification(config, seed=0)
  data = _data()
  results = {}
  for name, buckets in (("fixed", None), ("bucketed", batching.bucket_lengths(MAX_LENGTH))):
    results[name] = train.fit(
        hf.module, {"params": hf.params}, recipes.lora_recipe(rank=2),
        bert.classification_task(), train_data=data, steps=6, batch_size=8,
        learning_rate=1e-2, head=bert.HEAD_MODULES, targets=list(bert.ALL_TARGETS),
        progress=False, bucket_lengths=buckets)
  stream = batching.batches(data, 8, seed=0, bucket_lengths=batching.bucket_lengths(MAX_LENGTH))
  shapes = {next(stream)["input_ids"].shape[1] for _ in range(6)}  # fit's 6 batches
  assert max(shapes) < MAX_LENGTH  # every bucketed batch was shorter than fixed padding
  fixed, bucketed = results["fixed"].variables, results["bucketed"].variables
  differences = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                             fixed, bucketed)
  print("max |bucketed - fixed|", max(jax.tree.leaves(differences)))
  assert max(jax.tree.leaves(differences)) < 1e-5
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       fixed["lora"], jax.tree.map(np.zeros_like, fixed["lora"]))
  assert max(jax.tree.leaves(moved)) > 1e-3  # training did change the adapters


def test_every_row_once_per_epoch_without_drop_remainder():
  data = {"x": np.arange(10)}
  stream = batching.batches(data, 4, seed=0, drop_remainder=False)
  epoch = [next(stream) for _ in range(3)]
  assert sorted(np.concatenate([b["x"][b["weight"] > 0] for b in epoch]).tolist()) == list(range(10))
  assert [b["weight"].tolist() for b in epoch][-1] == [1.0, 1.0, 0.0, 0.0]
  dropped = batching.batches(data, 4, seed=0)
  assert sum(len(next(dropped)["x"]) for _ in range(2)) == 8  # the default drops 2 rows


def _shape_recording(task, shapes):
  """``task`` whose eval metrics record the token length of every batch shape they trace."""
  def metrics(outputs, batch):
    shapes.add(batch["input_ids"].shape[1])  # runs once per traced shape (jitted eval step)
    return task.metrics(outputs, batch)
  return dataclasses.replace(task, metrics=metrics)


def test_evaluation_batches_are_bucketed_and_score_as_fixed_padding():
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=MAX_LENGTH, num_labels=2,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  hf = transformers.FlaxBertForSequenceClassification(config, seed=0)
  data, held, test = _data(), _data(20, seed=1), _data(12, seed=2)
  buckets = batching.bucket_lengths(MAX_LENGTH)
  runs, eval_shapes = {}, {}
  for name, lengths in (("fixed", None), ("bucketed", buckets)):
    eval_shapes[name] = set()
    runs[name] = train.fit(
        hf.module, {"params": hf.params}, recipes.lora_recipe(rank=2),
        _shape_recording(bert.classification_task(num_classes=2), eval_shapes[name]),
        train_data=data, eval_data=held, test_data=test, steps=4, batch_size=8,
        eval_every=2, eval_at_start=True, learning_rate=1e-2, head=bert.HEAD_MODULES,
        targets=list(bert.ALL_TARGETS), progress=False, bucket_lengths=lengths)
  assert eval_shapes["fixed"] == {MAX_LENGTH}
  # every eval/test batch of these rows (3 to 20 tokens) fits 16 or 24 tokens
  assert eval_shapes["bucketed"] and max(eval_shapes["bucketed"]) < MAX_LENGTH
  fixed, bucketed = runs["fixed"], runs["bucketed"]
  assert set(fixed.final_metrics) == set(bucketed.final_metrics) >= {
      "eval_accuracy", "eval_macro_f1", "eval_loss", "test_accuracy", "test_loss"}
  for key, value in fixed.final_metrics.items():
    assert abs(value - bucketed.final_metrics[key]) < 1e-5, key
  for a, b in zip(fixed.history, bucketed.history):  # steps 0, 2 and 4
    assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
  # the same variables scored both ways: only rounding separates bucketed and fixed evaluation
  model, task = fixed.model, bert.classification_task(num_classes=2)
  scores = {name: train.evaluate(model, task, fixed.variables, {}, held, 8,
                                 bucket_lengths=lengths)
            for name, lengths in (("fixed", None), ("bucketed", buckets))}
  for key, value in scores["fixed"].items():
    assert abs(value - scores["bucketed"][key]) < 1e-5, key
