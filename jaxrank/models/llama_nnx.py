"""A LLaMA written in Flax NNX (``nnx.Linear``/``nnx.Embed``), loaded with SmolLM2's weights.

:class:`LlamaForCausalLM` mirrors transformers' ``FlaxLlamaForCausalLM`` module by module and
name by name, so its ``nnx.Param`` paths are the Linen params' paths
(``model/layers/0/self_attn/q_proj/kernel``) and :func:`jaxrank.nnx.wrap` takes the same PEFT
targets (``q_proj``, ``v_proj``, ...). Two differences, both deliberate:

* **tied embeddings**: there is no ``lm_head``; the logits are ``h @ embed_tokens.embedding.T``
  (``nnx.Embed.attend``), as in SmolLM2 itself. The Linen loader's ``lm_head/kernel`` is that
  transpose, so the logits are the same;
* **RoPE base**: the config's ``rope_theta`` (SmolLM2: 100000, the GGUF's
  ``llama.rope.freq_base``). transformers' own Flax LLaMA (4.57) hard-codes ``10000``;
  :func:`jaxrank.models.llama.causal_lm_class` (what the Linen loader builds) fixes that, so
  the Linen model, this one and PyTorch's ``LlamaForCausalLM`` give the same logits.

:func:`save_pretrained` writes the base weights as a Hugging Face folder that
``transformers.LlamaForCausalLM.from_pretrained`` loads (for PEFT adapters exported from NNX).

:func:`load_smollm2_nnx` reads the GGUF through :mod:`jaxrank.models.llama` (the same
dequantized arrays) and converts the Linen params with :func:`from_flax_params`.

Example (a tiny random config; the real model is ``load_smollm2_nnx()``):
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxrank.models import llama_nnx
  >>> config = llama_nnx.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
  ...                                num_hidden_layers=2, num_attention_heads=4,
  ...                                num_key_value_heads=2)
  >>> model = llama_nnx.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  >>> model(jnp.ones((2, 5), jnp.int32)).shape
  (2, 5, 32)
  >>> sorted(model.model.layers[0].self_attn.__dict__.keys() & {"q_proj", "k_proj"})
  ['k_proj', 'q_proj']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_INIT = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture numbers (the subset of ``transformers.LlamaConfig`` the model reads)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = True

  @classmethod
  def from_dict(cls, config: Any, **overrides) -> "LlamaConfig":
    """From the dict :func:`jaxrank.models.llama.read_gguf` builds (or a ``LlamaConfig``)."""
    if not isinstance(config, dict):
      config = config.to_dict()
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in config.items() if k in names}, **overrides})

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


class RMSNorm(nnx.Module):
  """``weight * x / sqrt(mean(x²) + eps)`` (transformers' ``FlaxLlamaRMSNorm``)."""

  def __init__(self, size: int, eps: float):
    self.weight = nnx.Param(jnp.ones((size,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
    return self.weight[...] * (x / jnp.sqrt(variance + self.eps)).astype(x.dtype)


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def rope(x, positions, theta: float):
  """RoPE on the two halves of the head dimension (HF layout); ``x`` is ``(b, s, h, d)``."""
  dim = x.shape[-1]
  inv_freq = jnp.asarray(1.0 / (theta ** (np.arange(0, dim, 2) / dim)), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate((angles, angles), axis=-1)[:, :, None, :]
  return x * jnp.cos(angles) + rotate_half(x) * jnp.sin(angles)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with RoPE (``q_proj``/``k_proj``/``v_proj``/``o_proj``)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    dense = lambda i, o: nnx.Linear(i, o, use_bias=False, kernel_init=_INIT, rngs=rngs)
    self.q_proj = dense(config.hidden_size, heads * d)
    self.k_proj = dense(config.hidden_size, kv * d)
    self.v_proj = dense(config.hidden_size, kv * d)
    self.o_proj = dense(heads * d, config.hidden_size)
    self.heads, self.kv_heads, self.head_dim = heads, kv, d
    self.theta = config.rope_theta

  def __call__(self, x, mask, positions):
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, self.heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    groups = self.heads // self.kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    q = q / jnp.sqrt(self.head_dim).astype(q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    causal = jnp.tril(jnp.ones((s, s), bool))
    allowed = causal[None, None] & (mask[:, None, None, :] > 0)
    scores = scores + jnp.where(allowed, 0.0, jnp.finfo(scores.dtype).min).astype(scores.dtype)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, self.heads * self.head_dim)
    return self.o_proj(out)


class MLP(nnx.Module):
  """SwiGLU: ``down_proj(up_proj(x) * silu(gate_proj(x)))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    dense = lambda i, o: nnx.Linear(i, o, use_bias=False, kernel_init=_INIT, rngs=rngs)
    self.gate_proj = dense(config.hidden_size, config.intermediate_size)
    self.up_proj = dense(config.hidden_size, config.intermediate_size)
    self.down_proj = dense(config.intermediate_size, config.hidden_size)

  def __call__(self, x):
    return self.down_proj(self.up_proj(x) * nnx.silu(self.gate_proj(x)))


class DecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, mask, positions):
    x = x + self.self_attn(self.input_layernorm(x), mask, positions)
    return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=_INIT,
                                  rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

  def __call__(self, input_ids, mask, positions):
    x = self.embed_tokens(input_ids.astype(jnp.int32))
    for layer in self.layers:
      x = layer(x, mask, positions)
    return self.norm(x)


class LlamaForCausalLM(nnx.Module):
  """``model(input_ids, attention_mask=None, position_ids=None) -> logits (b, s, vocab)``.

  Positions default to the count of unmasked tokens before each one (left-aligned batches
  give ``0..s-1``), as :func:`jaxrank.models.llama.causal_lm_task` feeds the Linen model.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    if not config.tie_word_embeddings:
      raise ValueError("llama_nnx implements tied embeddings only (SmolLM2's layout).")
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, position_ids=None):
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
      position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    hidden = self.model(input_ids, attention_mask, position_ids)
    return self.model.embed_tokens.attend(hidden)


def from_flax_params(config: LlamaConfig, params) -> LlamaForCausalLM:
  """An NNX model holding the ``FlaxLlamaForCausalLM`` ``params`` (no random init is run).

  ``lm_head/kernel`` must be the transposed embedding (tied), as the SmolLM2 loader makes it.
  """
  params = dict(params)
  head = params.pop("lm_head", None)
  embedding = params["model"]["embed_tokens"]["embedding"]
  if head is not None and not np.array_equal(np.asarray(head["kernel"]), np.asarray(embedding).T):
    raise ValueError("lm_head/kernel is not the transposed embedding; this NNX LLaMA ties them.")
  model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  from jaxrank import _tree
  like = nnx.state(model, nnx.Param)
  new = _tree.from_linen_view({"params": jax.tree.map(jnp.asarray, params)}, like)
  missing = [k for k, v in jax.tree_util.tree_leaves_with_path(new)
             if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"params lack {len(missing)} leaves, e.g. {jax.tree_util.keystr(missing[0])}")
  nnx.update(model, new)
  return model


def _torch_name(path: tuple) -> str:
  leaf = {"kernel": "weight", "embedding": "weight", "weight": "weight"}[path[-1]]
  return ".".join(path[:-1] + (leaf,))


def save_pretrained(model: LlamaForCausalLM, directory) -> None:
  """Writes ``model``'s base weights as ``config.json`` + ``model.safetensors`` (PyTorch names
  and layouts, tied embeddings) for ``transformers.LlamaForCausalLM.from_pretrained``.

  Only the base ``nnx.Param`` (not ``nnx.LoRAParam``) is written: an adapted model's adapter
  goes out separately with :func:`jaxrank.save_peft_adapter`.
  """
  import os
  import transformers
  from safetensors.numpy import save_file
  from flax import traverse_util
  from jaxrank import _tree
  if not isinstance(model, LlamaForCausalLM):
    raise TypeError(f"save_pretrained expects a llama_nnx.LlamaForCausalLM, got {type(model)}")
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  flat = traverse_util.flatten_dict(_tree.to_linen_view(base)["params"])
  tensors = {_torch_name(k): np.ascontiguousarray(np.asarray(v, np.float32).T
                                                  if k[-1] == "kernel" else np.asarray(v))
             for k, v in flat.items()}
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  config = transformers.LlamaConfig(**dataclasses.asdict(model.config),
                                    architectures=["LlamaForCausalLM"])
  config.save_pretrained(directory)


def load_smollm2_nnx(path=None, *, rope_theta: Optional[float] = None):
  """``(model, tokenizer)``: SmolLM2-135M as :class:`LlamaForCausalLM` (float32).

  The weights are exactly those of :func:`jaxrank.models.llama.load_smollm2`.
  ``rope_theta`` overrides the GGUF's (100000); 10000 reproduces transformers' unfixed
  ``FlaxLlamaForCausalLM``.
  """
  from jaxrank.models import llama
  config_dict, tensors, reader = llama.read_gguf(path)
  params = llama.gguf_to_flax_params(config_dict, tensors)
  overrides = {} if rope_theta is None else {"rope_theta": float(rope_theta)}
  config = LlamaConfig.from_dict(config_dict, **overrides)
  return from_flax_params(config, params), llama.gguf_tokenizer(reader)


def causal_lm_task():
  """The :class:`jaxrank.tasks.Task` of an NNX causal LM (``apply(model, batch)``).

  The NNX task's ``apply`` takes the (adapted) model itself, no variables:
  ``apply(model, batch) -> logits``; loss and metrics are the Linen task's.
  """
  from jaxrank import tasks

  def apply(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])

  return tasks.causal_lm_task(apply)
