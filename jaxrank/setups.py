"""Ready-made model + task + data set-ups of the ``jaxrank`` command (real, offline).

:data:`SETUPS` maps each ``(model, task)`` pair to a loader; :func:`load_setup` builds one.
Every loader imports its model library (transformers) only when it is called, so listing the
set-ups needs nothing beyond the base install.

* ``minilm`` / ``bbc-news``: all-MiniLM-L6-v2 classifying BBC News articles (5 classes);
* ``smollm2`` / ``austen``: SmolLM2-135M on Jane Austen's novels (causal LM, perplexity);
* ``tiny-bert`` / ``synthetic``: a random 2-layer BERT on a synthetic task (seconds).

:func:`own_data_setup` is the user's own data (CSV, JSON Lines, Parquet files or columns in
memory, :mod:`jaxrank.datafiles`) on ``minilm``, ``smollm2`` or a local Hugging Face model
directory (:mod:`jaxrank._local_models`): classification with a label field, causal LM
without.

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
from pathlib import Path
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
  # own data: the class names (class i is label_names[i]) and the bucket lengths of its batches
  label_names: Optional[tuple] = None
  bucket_lengths: Optional[tuple] = None


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

  # a random model: its pooler is as fresh as its classifier, so both train
  return Setup(hf.module, {"params": hf.params}, bert.classification_task(),
               ("classifier", "pooler"), list(bert.ALL_TARGETS), make(train_examples),
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


# --- the user's own data ------------------------------------------------------------------
def load_base_model(model: str, *, num_labels: Optional[int], seed: int = 0):
  """A :class:`jaxrank._local_models.LocalModel` for ``model``: ``minilm`` (the bundled
  all-MiniLM-L6-v2 folder), ``smollm2`` (the bundled GGUF) or a Hugging Face model folder."""
  from jaxrank import _local_models
  if model == "minilm":
    from jaxrank.models import bert
    return _local_models.load_local_model(bert.minilm_path(), num_labels=num_labels, seed=seed)
  if model == "smollm2":
    from jaxrank.models import llama
    hf, tokenizer = llama.load_smollm2()
    return _local_models.LocalModel("llama", hf.module, hf.params, hf.config, tokenizer, (),
                                    tuple(llama.ATTENTION_TARGETS), 0)
  if _local_models.is_model_directory(model):
    return _local_models.load_local_model(model, num_labels=num_labels, seed=seed)
  raise ValueError(f"--model {model!r} is neither minilm, smollm2 nor a model folder; with "
                   "--train FILE pass one of those (a folder holds config.json, weights and "
                   "tokenizer files, as save_pretrained writes).")


def tokenize_texts(tokenizer, texts, max_length: int, *, pad_id: int = 0,
                   token_type_ids: bool = True, option: str = "--train") -> dict:
  """``input_ids``, ``attention_mask`` (and ``token_type_ids``), right-padded to
  ``max_length``; ValueError when no text has a token beyond the special ones."""
  from jaxrank.models import bert
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)
  encodings = tokenizer.encode_batch(list(texts))
  if not any(len(e.ids) - sum(e.special_tokens_mask) > 0 for e in encodings):
    raise ValueError(f"{option}: every text is empty after tokenisation (no token beyond the "
                     "special ones); check --text-field.")
  arrays = bert.encode(tokenizer, texts, max_length=max_length, pad_to=max_length,
                       pad_id=pad_id)
  if not token_type_ids:
    del arrays["token_type_ids"]
  return arrays


def own_data_setup(model: str, train, *, text_field: str = "text",
                   label_field: Optional[str] = None, validation=None, test=None,
                   validation_fraction: float = 0.1, max_length: int = 128, seed: int = 0,
                   train_examples: int = 0, eval_examples: int = 0,
                   bucketing: bool = True) -> Setup:
  """The :class:`Setup` of the user's own texts on ``model``.

  Args:
    model: ``minilm``, ``smollm2`` or a Hugging Face model folder (BERT family with
      ``label_field``, LLaMA family without).
    train, validation, test: file paths (CSV, JSON Lines, Parquet), ``datasets.Dataset`` objects,
      dicts of columns or ``(texts, labels)`` pairs (:func:`jaxrank.datafiles.load_texts`).
      Without ``validation``, a seeded stratified ``validation_fraction`` of ``train`` is
      held out.
    text_field, label_field: the columns; ``label_field=None`` trains a causal LM.
    max_length: tokens per example (longer texts are truncated).
    train_examples, eval_examples: use only the first N rows (0: all).
    bucketing: pad each batch to the smallest of :func:`jaxrank.batching.bucket_lengths`
      that holds it (False: every batch at ``max_length``).

  Every bad input (unsupported architecture, no tokenizer, missing field, one class, empty
  file, texts empty after tokenisation) raises a ValueError before any training.
  """
  from jaxrank import _local_models
  from jaxrank import batching
  from jaxrank import datafiles
  from jaxrank.models import bert
  from jaxrank.models import llama
  classify = label_field is not None
  if _local_models.is_model_directory(model):
    family = _local_models.model_family(model)  # an unsupported architecture fails here
    _local_models._check_files(Path(model).expanduser())
  else:
    family = {"minilm": "bert", "smollm2": "llama"}.get(model)
  if family == "bert" and not classify:
    raise ValueError(f"--model {model} is a BERT-family encoder: it classifies; pass "
                     "--label-field NAME (or a LLaMA-family model for causal-LM text).")
  if family == "llama" and classify:
    raise ValueError(f"--model {model} is a LLaMA-family causal LM; drop --label-field to "
                     "train it on --text-field alone (classification needs a BERT-family "
                     "model).")
  load = lambda source, option, names=None: datafiles.load_texts(
      source, text_field=text_field, label_field=label_field, label_names=names, option=option)
  train_texts = load(train, "--train")
  names = train_texts.label_names
  if validation is None:
    keep, held = datafiles.stratified_holdout(train_texts.labels, len(train_texts),
                                              validation_fraction, seed)
    train_texts, validation_texts = train_texts.take(keep), train_texts.take(held)
  else:
    validation_texts = load(validation, "--validation", names)
  test_texts = load(test, "--test", names) if test is not None else None
  base = load_base_model(model, num_labels=len(names) if classify else None, seed=seed)

  def arrays(texts, n, option):
    texts = texts.take(np.arange(min(n, len(texts)))) if n else texts
    data = tokenize_texts(base.tokenizer, texts.texts, max_length, pad_id=base.pad_id,
                          token_type_ids=classify, option=option)
    if classify:
      data["labels"] = texts.labels
    return data

  train_data = arrays(train_texts, train_examples, "--train")
  eval_data = arrays(validation_texts, eval_examples, "--validation")
  test_data = arrays(test_texts, eval_examples, "--test") if test_texts is not None else None
  if classify:
    task, metric = bert.classification_task(num_classes=len(names)), "accuracy"
  else:
    task, metric = llama.causal_lm_task(), "perplexity"
  return Setup(base.module, {"params": base.params}, task, base.head, list(base.targets),
               train_data, eval_data, test_data, metric, label_names=names,
               bucket_lengths=batching.bucket_lengths(max_length) if bucketing else None)
