"""Ready-made model + task + data set-ups of the ``jaxrank`` command (real, offline).

:data:`SETUPS` maps each ``(model, task)`` pair to a loader; :func:`load_setup` builds one.
Every loader imports its model library (transformers) only when it is called, so listing the
set-ups needs nothing beyond the base install.

* ``minilm`` / ``bbc-news``: all-MiniLM-L6-v2 classifying BBC News articles (5 classes);
* ``smollm2`` / ``austen``: SmolLM2-135M on Jane Austen's novels (causal LM, perplexity);
* ``tiny-bert`` / ``synthetic``: a random 2-layer BERT on a synthetic task (seconds).

Example:
  >>> from jaxrank import setups
  >>> setups.MODELS, setups.TASKS
  (('minilm', 'smollm2', 'tiny-bert'), ('bbc-news', 'austen', 'synthetic'))
  >>> setups.load_setup("minilm", "austen", seed=0, train_examples=0, max_length=16)
  ... # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: --model minilm --task austen is not available; use one of --model minilm ...
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class Setup:
  """A base model, its task and its data as arrays."""

  base: object
  variables: dict
  task: object
  head: tuple
  targets: object
  train_data: dict
  eval_data: dict
  test_data: Optional[dict]
  metric: str


def tiny_bert_setup(seed: int, train_examples: int, max_length: int,
                    eval_examples: int = 0) -> Setup:
  """A random 2-layer BERT on a synthetic 'which marker token appears' task.

  ``train_examples`` defaults (0) to 64; evaluation uses a quarter as many (at least 16).
  """
  del eval_examples
  import transformers
  from jaxrank.models import bert
  train_examples = train_examples or 64
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=max(max_length, 16), num_labels=3)
  hf = transformers.FlaxBertForSequenceClassification(config, seed=seed)
  rng = np.random.default_rng(seed)

  def make(n):
    ids = rng.integers(10, 64, size=(n, max_length)).astype(np.int32)
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    ids[:, 0] = 1
    ids[np.arange(n), rng.integers(1, max_length, size=n)] = 2 + labels  # the marker token
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "labels": labels}

  return Setup(hf.module, {"params": hf.params}, bert.classification_task(),
               bert.HEAD_MODULES, list(bert.ALL_TARGETS), make(train_examples),
               make(max(16, train_examples // 4)), make(max(16, train_examples // 4)),
               "accuracy")


def minilm_setup(seed: int, train_examples: int, max_length: int,
                 eval_examples: int = 0) -> Setup:
  """MiniLM with a fresh classifier on BBC News (0 examples: the whole split)."""
  from jaxrank.data import bbc_news
  from jaxrank.models import bert
  splits = bbc_news.load_bbc_news()
  hf, tokenizer = bert.load_minilm(num_labels=splits["train"].num_labels, seed=seed)
  take = lambda split, n: split.take(n) if n else split
  arrays = lambda split, n: bert.tokenize_classification(tokenizer, take(split, n), max_length)
  return Setup(hf.module, {"params": hf.params}, bert.classification_task(), bert.HEAD_MODULES,
               list(bert.ALL_TARGETS), arrays(splits["train"], train_examples),
               arrays(splits["validation"], eval_examples),
               arrays(splits["test"], eval_examples), "accuracy")


def smollm2_setup(seed: int, train_examples: int, max_length: int,
                  eval_examples: int = 0) -> Setup:
  """SmolLM2-135M on Jane Austen chunks (evaluation: 64 chunks by default)."""
  del seed  # the pretrained model has no fresh head
  from jaxrank.data import austen
  from jaxrank.models import llama
  hf, tokenizer = llama.load_smollm2()
  splits = austen.load_austen_chunks(tokenizer, max_length=max_length)
  take = lambda data, n: {k: v[:n] for k, v in data.items()} if n else data
  return Setup(hf.module, {"params": hf.params}, llama.causal_lm_task(), (),
               list(llama.ATTENTION_TARGETS), take(splits["train"], train_examples),
               take(splits["validation"], eval_examples or 64),
               take(splits["test"], eval_examples or 64), "perplexity")


SETUPS: dict[tuple[str, str], Callable[..., Setup]] = {
    ("minilm", "bbc-news"): minilm_setup,
    ("smollm2", "austen"): smollm2_setup,
    ("tiny-bert", "synthetic"): tiny_bert_setup,
}
MODELS = tuple(model for model, _ in SETUPS)
TASKS = tuple(task for _, task in SETUPS)
PAIRS = ", ".join(f"--model {m} --task {t}" for m, t in SETUPS)


def load_setup(model: str, task: str, *, seed: int, train_examples: int, max_length: int,
               eval_examples: int = 0) -> Setup:
  """The :class:`Setup` of ``model`` on ``task`` (a key of :data:`SETUPS`)."""
  if (model, task) not in SETUPS:
    raise ValueError(f"--model {model} --task {task} is not available; use one of {PAIRS}")
  return SETUPS[(model, task)](seed, train_examples, max_length, eval_examples)
