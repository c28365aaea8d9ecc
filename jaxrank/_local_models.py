"""A Hugging Face model directory on disk as a jaxrank base model (BERT or LLaMA family).

:func:`load_local_model` reads a folder such as ``save_pretrained`` writes (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, tokenizer files) into the Flax classes of
transformers 4.57, offline:

* ``model_type`` ``bert``: ``FlaxBertForSequenceClassification`` with a ``classifier`` of
  ``num_labels`` outputs: fresh and seeded for an encoder-only checkpoint; the saved one for a
  classifier checkpoint of that size; for a saved classifier of another size, what
  transformers' ``ignore_mismatched_sizes=True`` does: the encoder (and pooler) load, the
  classifier is fresh, and a ``UserWarning`` names both sizes. A pooler in the checkpoint
  loads with its pretrained weights and stays frozen, as in PyTorch + PEFT's sequence
  classification; only the classifier is the trained head. A checkpoint without pooler
  weights gets a fresh pooler, which then trains with the classifier;
* ``model_type`` ``llama``: ``FlaxLlamaForCausalLM`` with RoPE at the config's ``rope_theta``
  (:func:`jaxrank.models.llama.causal_lm_class`; transformers' class hard-codes 10000; a
  ``rope_scaling`` config is refused); tied embeddings (``tie_word_embeddings``) become
  ``lm_head/kernel`` = the transposed token embedding (the Flax LLaMA has no tying).

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


def saved_classifier_size(path) -> Optional[int]:
  """The output count of the checkpoint's saved ``classifier`` (None when it has none): the
  shape of its bias in ``model.safetensors`` (or its index), ``pytorch_model.bin`` or
  ``flax_model.msgpack``."""
  path = Path(path).expanduser()
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    name = next((k for k in weight_map if k.endswith("classifier.bias")), None)
    return None if name is None else _safetensors_shape(path / weight_map[name], name)[0]
  if (path / "model.safetensors").is_file():
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
      name = next((k for k in f.keys() if k.endswith("classifier.bias")), None)
      return None if name is None else int(f.get_slice(name).get_shape()[0])
  if (path / "pytorch_model.bin").is_file():
    import torch
    state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True,
                       mmap=True)
    name = next((k for k in state if k.endswith("classifier.bias")), None)
    return None if name is None else int(state[name].shape[0])
  if (path / "flax_model.msgpack").is_file():
    from flax import serialization
    state = serialization.msgpack_restore((path / "flax_model.msgpack").read_bytes())
    bias = state.get("classifier", {}).get("bias")
    return None if bias is None else int(bias.shape[0])
  return None  # sharded pytorch_model.bin: transformers reports a mismatch itself


def _safetensors_shape(file: Path, name: str) -> tuple:
  from safetensors import safe_open
  with safe_open(str(file), framework="numpy") as f:
    return tuple(int(n) for n in f.get_slice(name).get_shape())


def _with_fresh_classifier(cls, path: Path, saved: int, num_labels: int, seed: int, dtype):
  """``(model of num_labels classes, params)``: the checkpoint loaded at its own classifier size
  (transformers' PyTorch-to-Flax conversion cannot skip a mismatched tensor), its classifier
  replaced by the one a ``num_labels`` model initialises from ``seed`` (the classifier an
  encoder-only checkpoint would get)."""
  import copy
  import jax
  loaded = _from_pretrained(cls, path, num_labels=saved, seed=seed, dtype=dtype)
  config = copy.deepcopy(loaded.config)
  config.num_labels = num_labels  # fresh LABEL_i names of the new size
  model = _quiet(cls, config, seed=seed, dtype=dtype, _do_init=False)
  init = jax.jit(lambda key: model.init_weights(key, (1, 1))["classifier"])  # only the head
  fresh = _quiet(init, jax.random.PRNGKey(seed))
  return model, {**loaded.params, "classifier": fresh}


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
    cls = transformers.FlaxBertForSequenceClassification
    saved = saved_classifier_size(path)
    if saved is None or saved == num_labels:
      hf = _from_pretrained(cls, path, num_labels=num_labels, seed=seed, dtype=dtype)
      params = hf.params
    else:
      warnings.warn(
          f"--model {path}: its saved classifier has {saved} outputs but the data has "
          f"{num_labels} classes; loading the encoder and a fresh {num_labels}-way classifier "
          "in its place (as transformers' ignore_mismatched_sizes=True does).", UserWarning,
          stacklevel=2)
      hf, params = _with_fresh_classifier(cls, path, saved, num_labels, seed, dtype)
    head = bert.HEAD_MODULES + (() if _has_weights_named(path, "pooler") else ("pooler",))
    return LocalModel("bert", hf.module, params, hf.config, tokenizer, head,
                      tuple(bert_targets or bert.ALL_TARGETS), pad_id)
  from jaxrank.models import llama
  rope_scaling = json.loads((path / "config.json").read_text()).get("rope_scaling")
  if rope_scaling:
    raise ValueError(f"--model {path}: rope_scaling={rope_scaling!r} is not supported by the "
                     "Flax LLaMA; use a checkpoint without rope_scaling.")
  # RoPE at config.rope_theta (transformers' FlaxLlamaForCausalLM hard-codes 10000)
  hf = _from_pretrained(llama.causal_lm_class(), path, dtype=dtype)
  params = jax.tree.map(jnp.asarray, hf.params)
  if getattr(hf.config, "tie_word_embeddings", False):
    embedding = params["model"]["embed_tokens"]["embedding"]
    params = {**params, "lm_head": {"kernel": jnp.asarray(embedding).T}}
  return LocalModel("llama", hf.module, params, hf.config, tokenizer, (),
                    tuple(llama.ATTENTION_TARGETS), pad_id)
