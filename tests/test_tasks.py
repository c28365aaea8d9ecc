"""jaxrank.tasks: the classification and causal-LM losses, metrics and summaries."""

import math

import numpy as np
import pytest

from jaxrank import tasks


def test_classification_weights_drop_padding_rows():
  logits = np.array([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]], np.float32)
  batch = {"labels": np.array([0, 1, 0]), "weight": np.array([1.0, 1.0, 0.0], np.float32)}
  sums = tasks.classification_metrics(logits, batch)
  assert float(sums["count"]) == 2.0 and float(sums["correct"]) == 2.0
  summary = tasks.summarize_classification(sums)
  assert summary["accuracy"] == 1.0
  assert summary["loss"] == pytest.approx(float(tasks.classification_loss(logits, batch)))
  # without weights every row counts
  unweighted = tasks.classification_metrics(logits, {"labels": batch["labels"]})
  assert float(unweighted["count"]) == 3.0 and float(unweighted["correct"]) == 2.0


def test_outputs_may_be_a_tuple_or_carry_logits():
  logits = np.array([[1.0, 0.0]], np.float32)
  batch = {"labels": np.array([0])}
  holder = type("Out", (), {"logits": logits})()
  expected = float(tasks.classification_loss(logits, batch))
  assert float(tasks.classification_loss((logits,), batch)) == pytest.approx(expected)
  assert float(tasks.classification_loss(holder, batch)) == pytest.approx(expected)


def test_causal_lm_scores_next_tokens_under_the_mask():
  vocab = 4
  ids = np.array([[1, 2, 3, 0]])
  mask = np.array([[1, 1, 1, 0]])
  logits = np.zeros((1, 4, vocab), np.float32)  # uniform: nll = log(vocab) per token
  batch = {"input_ids": ids, "attention_mask": mask}
  sums = tasks.causal_lm_metrics(logits, batch)
  assert float(sums["tokens"]) == 2.0  # targets 2 and 3; the padding target is masked
  assert float(tasks.causal_lm_loss(logits, batch)) == pytest.approx(math.log(vocab), rel=1e-6)
  summary = tasks.summarize_causal_lm(sums)
  assert summary["perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_task_builders_bundle_the_functions():
  apply = lambda model, variables, batch, rngs=None, deterministic=True: None
  task = tasks.classification_task(apply)
  assert task.apply is apply and task.loss is tasks.classification_loss
  assert tasks.causal_lm_task(apply).summarize is tasks.summarize_causal_lm
