"""Tasks: how the training loop runs a model on a batch and scores it.

A :class:`Task` bundles four functions: ``apply`` (model + variables + batch -> outputs),
``loss`` (the scalar that is differentiated), ``metrics`` (sums that add up over batches) and
``summarize`` (sums -> reported values). Two families ship with jaxrank: classification
(cross-entropy, accuracy and, given the number of classes, macro-F1) and causal language
modelling (next-token cross-entropy and
perplexity). Every loss and metric honours an optional per-example ``weight`` in the batch
(0 marks the padding rows of the last evaluation batch, see :func:`jaxrank.batching.eval_batches`).

Example:
  >>> import numpy as np
  >>> from jaxrank import tasks
  >>> logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], np.float32)
  >>> batch = {"labels": np.array([0, 1, 1]), "weight": np.array([1.0, 1.0, 0.0], np.float32)}
  >>> sums = tasks.classification_metrics(logits, batch)
  >>> tasks.summarize_classification(sums)["accuracy"]
  1.0
  >>> round(float(tasks.classification_loss(logits, batch)), 4)
  0.1269
  >>> sums = tasks.classification_metrics(logits, batch, num_classes=2)
  >>> tasks.summarize_classification(sums)["macro_f1"]  # one row is padding (weight 0)
  1.0
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Task:
  """How to run the model on a batch and score it.

  Attributes:
    apply: ``apply(model, variables, batch, *, rngs=None, deterministic=True) -> outputs``.
    loss: ``loss(outputs, batch) -> scalar`` (mean over the batch's weighted examples).
    metrics: ``metrics(outputs, batch) -> {name: sum}`` additive over batches.
    summarize: ``summarize(sums) -> {name: value}`` (e.g. accuracy, perplexity).
  """

  apply: Callable
  loss: Callable
  metrics: Callable
  summarize: Callable


def _weights(batch, n):
  return batch["weight"] if "weight" in batch else jnp.ones((n,), jnp.float32)


def _logits(outputs):
  if hasattr(outputs, "logits"):
    return outputs.logits
  return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


# --- classification -------------------------------------------------------------------------
def classification_loss(outputs, batch):
  """Mean cross-entropy over the (weighted) examples."""
  logits = _logits(outputs).astype(jnp.float32)
  w = _weights(batch, logits.shape[0])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_metrics(outputs, batch, num_classes: Optional[int] = None):
  """Summed cross-entropy, correct predictions and example count (weighted); with
  ``num_classes`` also the weighted ``confusion`` matrix (rows: label, columns: prediction)."""
  logits = _logits(outputs).astype(jnp.float32)
  w = _weights(batch, logits.shape[0])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  predicted = jnp.argmax(logits, -1)
  correct = (predicted == batch["labels"]).astype(jnp.float32)
  sums = {"loss": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}
  if num_classes is not None:
    label_hot = jax.nn.one_hot(batch["labels"], num_classes) * w[:, None]
    sums["confusion"] = label_hot.T @ jax.nn.one_hot(predicted, num_classes)
  return sums


def macro_f1(confusion) -> float:
  """The unweighted mean over classes of ``F1 = 2 TP / (2 TP + FP + FN)`` from a confusion
  matrix (rows: label, columns: prediction); classes never labelled nor predicted are left out
  (scikit-learn's ``f1_score(average="macro")``).

  >>> macro_f1([[3, 1], [0, 2]])  # class 0: F1 6/7, class 1: 4/5
  0.8285714285714285
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  denominator = confusion.sum(0) + confusion.sum(1)  # 2 TP + FP + FN
  present = denominator > 0
  return float(np.mean(2 * tp[present] / denominator[present])) if present.any() else 0.0


def summarize_classification(sums):
  """Mean loss, accuracy and (when the sums hold a confusion matrix) macro-F1 from
  :func:`classification_metrics` sums."""
  count = max(float(sums["count"]), 1.0)
  summary = {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}
  if "confusion" in sums:
    summary["macro_f1"] = macro_f1(sums["confusion"])
  return summary


def classification_task(apply: Callable, num_classes: Optional[int] = None) -> Task:
  """The classification :class:`Task` of ``apply`` (cross-entropy, accuracy; with
  ``num_classes`` also macro-F1)."""
  metrics = (classification_metrics if num_classes is None else
             functools.partial(classification_metrics, num_classes=num_classes))
  return Task(apply=apply, loss=classification_loss, metrics=metrics,
              summarize=summarize_classification)


# --- causal language modelling ----------------------------------------------------------------
def _next_token_nll(outputs, batch):
  logits = _logits(outputs)[:, :-1].astype(jnp.float32)
  targets = batch["input_ids"][:, 1:]
  mask = batch["attention_mask"][:, 1:].astype(jnp.float32)
  mask = mask * _weights(batch, logits.shape[0])[:, None]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask
  return nll, jnp.sum(mask)


def causal_lm_loss(outputs, batch):
  """Mean next-token cross-entropy over the non-padding target tokens."""
  nll, tokens = _next_token_nll(outputs, batch)
  return jnp.sum(nll) / jnp.maximum(tokens, 1.0)


def causal_lm_metrics(outputs, batch):
  """Summed next-token cross-entropy and the number of target tokens."""
  nll, tokens = _next_token_nll(outputs, batch)
  return {"nll": jnp.sum(nll), "tokens": tokens}


def summarize_causal_lm(sums):
  """Mean next-token loss and perplexity from :func:`causal_lm_metrics` sums."""
  nll = float(sums["nll"]) / max(float(sums["tokens"]), 1.0)
  return {"loss": nll, "perplexity": math.exp(min(nll, 50.0))}


def causal_lm_task(apply: Callable) -> Task:
  """The causal-LM :class:`Task` of ``apply`` (next-token cross-entropy, perplexity)."""
  return Task(apply=apply, loss=causal_lm_loss, metrics=causal_lm_metrics,
              summarize=summarize_causal_lm)
