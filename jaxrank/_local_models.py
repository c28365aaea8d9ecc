"""A Hugging Face model directory on disk as a jaxrank base model (BERT or LLaMA family).

:func:`load_local_model` reads a folder such as ``save_pretrained`` writes (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, tokenizer files) into the Flax classes of
transformers 4.57, offline:

* ``model_type`` ``bert``: ``FlaxBertForSequenceClassification`` with a fresh, seeded
  ``classifier`` of ``num_labels`` outputs (a classifier of another size in the checkpoint is
  replaced). A pooler in the checkpoint loads with its pretrained weights and stays frozen, as
  in PyTorch + PEFT's sequence classification; only the classifier is the trained head. A
  checkpoint without pooler weights gets a fresh pooler, which then trains with the classifier;
* ``model_type`` ``llama``: ``FlaxLlamaForCausalLM``; tied embeddings
  (``tie_word_embeddings``) become ``lm_head/kernel`` = the transposed token embedding (the
  Flax LLaMA has no tying).

The tokenizer is the folder's fast tokenizer (``transformers.AutoTokenizer``; its
``tokenizers.Tokenizer`` is what jaxrank encodes with). ``safetensors`` weights need no torch;
``pytorch_model.bin`` weights do (``pip install torch``).

Example:
  >>> import tempfile
  >>> load_local_model(tempfile.mkdtemp(), num_labels=2)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: --model ...: no config.json in this folder; pass a Hugging Face model directory ...
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

BERT_TYPES = ("bert",)
LLAMA_TYPES = ("llama",)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")


class LocalModel(NamedTuple):
  """A loaded model directory.

  Attributes:
    family: ``"bert"`` (sequence classification) or ``"llama"`` (causal LM).
    module: the Flax Linen module (what :func:`jaxrank.train.fit` wraps).
    params: its parameters (pretrained weights, plus the fresh classifier for ``bert``).
    config: the transformers config.
    tokenizer: a ``tokenizers.Tokenizer`` (no padding; truncation set by the caller).
    head: the ``params`` modules trained in full (``("classifier",)`` or ``()``).
    targets: default LoRA targets in PEFT naming.
    pad_id: the token id used for padding.
  """

  family: str
  module: Any
  params: Any
  config: Any
  tokenizer: Any
  head: tuple
  targets: tuple
  pad_id: int


def is_model_directory(name: str) -> bool:
  """True when ``name`` is an existing folder (a local checkpoint, not a built-in name)."""
  return Path(name).expanduser().is_dir()


def model_family(path) -> str:
  """``"bert"`` or ``"llama"`` from ``config.json``'s ``model_type``; ValueError naming the
  fix for a folder that is no Hugging Face directory or holds another architecture."""
  path = Path(path).expanduser()
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ValueError(f"--model {path}: no config.json in this folder; pass a Hugging Face model "
                     "directory (what save_pretrained writes) or a built-in name.")
  try:
    config = json.loads(config_file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"--model {path}: config.json is not valid JSON ({error}).") from None
  model_type = config.get("model_type")
  if model_type in BERT_TYPES:
    return "bert"
  if model_type in LLAMA_TYPES:
    return "llama"
  architectures = ", ".join(config.get("architectures") or []) or "none named"
  raise ValueError(
      f"--model {path}: unsupported architecture model_type={model_type!r} ({architectures}); "
      f"jaxrank loads the BERT family ({', '.join(BERT_TYPES)}: sequence classification) and "
      f"the LLaMA family ({', '.join(LLAMA_TYPES)}: causal LM). For another Flax model, call "
      "jaxrank.wrap on it in Python.")


def _check_files(path: Path):
  if not any((path / name).is_file() for name in WEIGHT_FILES):
    raise ValueError(f"--model {path}: no weights (one of {', '.join(WEIGHT_FILES)}).")
  if not any((path / name).is_file() for name in TOKENIZER_FILES):
    raise ValueError(
        f"--model {path}: no tokenizer (one of {', '.join(TOKENIZER_FILES)}); save the "
        "tokenizer beside the model (tokenizer.save_pretrained(folder)).")
  if ((path / "pytorch_model.bin").is_file() and not (path / "model.safetensors").is_file()):
    try:
      import torch  # noqa: F401
    except ImportError:
      raise ValueError(f"--model {path}: its weights are pytorch_model.bin, which needs torch "
                       "to read: `pip install torch`, or save the model with "
                       "safe_serialization=True (model.safetensors).") from None


def _has_weights_named(path: Path, part: str) -> bool:
  """Whether the checkpoint's safetensors weights have a name containing ``part`` (True when
  the weights are not safetensors and the names cannot be read cheaply)."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    return any(part in name for name in json.loads(index.read_text()).get("weight_map", {}))
  if (path / "model.safetensors").is_file():
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
      return any(part in name for name in f.keys())
  return True


def load_tokenizer(path):
  """The folder's fast tokenizer as a ``tokenizers.Tokenizer`` with padding switched off."""
  import transformers
  path = Path(path).expanduser()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True,
                                                                local_files_only=True)
  except (OSError, ValueError, TypeError) as error:
    raise ValueError(f"--model {path}: its tokenizer does not load ({error}).") from None
  backend = getattr(hf_tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"--model {path}: no fast tokenizer could be built from its files.")
  backend.no_padding()
  backend.no_truncation()
  pad_id = hf_tokenizer.pad_token_id
  if pad_id is None:
    pad_id = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else 0
  return backend, int(pad_id)


def _quiet(fn, *args, **kwargs):
  """transformers' logs about newly initialised heads and deprecated Flax classes, muted."""
  loggers = [logging.getLogger(name) for name in ("transformers.modeling_flax_utils",
                                                  "transformers.modeling_flax_pytorch_utils")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return fn(*args, **kwargs)
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _from_pretrained(cls, path: Path, **kwargs):
  from_pt = not (path / "flax_model.msgpack").is_file()
  return _quiet(cls.from_pretrained, str(path), from_pt=from_pt, local_files_only=True, **kwargs)


def load_local_model(path, *, num_labels: Optional[int] = None, seed: int = 0, dtype=None,
                     bert_targets: Optional[Sequence[str]] = None) -> LocalModel:
  """Loads the Hugging Face model directory ``path`` (see the module docstring).

  Args:
    path: the folder.
    num_labels: classes of the fresh classifier (BERT family; required there).
    seed: seeds the classifier's initialisation.
    dtype: the computation dtype (float32 by default).
    bert_targets: LoRA targets of a BERT (default: every linear of the encoder).

  Raises:
    ValueError: no config.json, an unsupported ``model_type``, no weights, no tokenizer.
  """
  import jax
  import jax.numpy as jnp
  import transformers
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  path = Path(path).expanduser()
  family = model_family(path)
  _check_files(path)
  tokenizer, pad_id = load_tokenizer(path)
  dtype = jnp.float32 if dtype is None else dtype
  if family == "bert":
    from jaxrank.models import bert
    if num_labels is None or num_labels < 2:
      raise ValueError(f"a BERT-family model classifies: num_labels must be >= 2, got "
                       f"{num_labels}.")
    hf = _from_pretrained(transformers.FlaxBertForSequenceClassification, path,
                          num_labels=num_labels, seed=seed, dtype=dtype,
                          ignore_mismatched_sizes=True)
    head = bert.HEAD_MODULES + (() if _has_weights_named(path, "pooler") else ("pooler",))
    return LocalModel("bert", hf.module, hf.params, hf.config, tokenizer, head,
                      tuple(bert_targets or bert.ALL_TARGETS), pad_id)
  from jaxrank.models import llama
  hf = _from_pretrained(transformers.FlaxLlamaForCausalLM, path, dtype=dtype)
  params = jax.tree.map(jnp.asarray, hf.params)
  if getattr(hf.config, "tie_word_embeddings", False):
    embedding = params["model"]["embed_tokens"]["embedding"]
    params = {**params, "lm_head": {"kernel": jnp.asarray(embedding).T}}
  return LocalModel("llama", hf.module, params, hf.config, tokenizer, (),
                    tuple(llama.ATTENTION_TARGETS), pad_id)
