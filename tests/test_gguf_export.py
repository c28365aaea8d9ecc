"""GGUF export of a merged LLaMA: the layout of the source GGUF, read back by ``gguf`` and by
jaxrank's SmolLM2 loader.

The source is a tiny llama GGUF written here the way llama.cpp's converter writes one (Q/K rows
permuted, matrices ``(out, in)``), with several tensor types: Q8_0, Q4_1, F16 and F32.
"""

import numpy as np
import pytest

import jaxrank

gguf = pytest.importorskip("gguf", reason="install the 'data' extra (gguf)")
transformers = pytest.importorskip("transformers", reason="install the 'hf' extra")
if not hasattr(transformers, "FlaxLlamaForCausalLM"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxrank import _gguf_export  # noqa: E402
from jaxrank.models import llama  # noqa: E402

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
# the source type of each block matrix (the rest: token_embd Q8_0, norms F32)
BLOCK_TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.F32,
               "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}
TOKENS = ["<|endoftext|>", "<|im_start|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    "Ġ", "Ġa", "Ġb", "ab", "ba", "Ġab", ".", ",", "!", "?", "x1", "x2"]


def _write_source(path):
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_name("tiny-llama")
  writer.add_block_count(LAYERS)
  writer.add_context_length(64)
  writer.add_embedding_length(HIDDEN)
  writer.add_feed_forward_length(FFN)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(TOKENS)
  writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
  writer.add_token_merges(["Ġ a", "Ġ b", "a b", "b a", "Ġa b"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(0)
  writer.add_chat_template("{{ messages }}")

  def add(name, shape, qtype, scale=0.3):
    array = rng.normal(0, scale, shape).astype(np.float32)
    if name.endswith("norm.weight"):
      array = 1.0 + 0.1 * array
    writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

  add("token_embd.weight", (len(TOKENS), HIDDEN), Q.Q8_0)
  shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
            "attn_v": (HIDDEN * KV_HEADS // HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
            "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
  for i in range(LAYERS):
    add(f"blk.{i}.attn_norm.weight", (HIDDEN,), Q.F32)
    for name, shape in shapes.items():
      add(f"blk.{i}.{name}.weight", shape, BLOCK_TYPES[name])
    add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), Q.F32)
  add("output_norm.weight", (HIDDEN,), Q.F32)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def merged_setup(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gguf")
  source = _write_source(folder / "tiny.gguf")
  hf, _ = llama.load_smollm2(path=source)
  ids = np.array([[1, 5, 9, 12, 30, 31, 7, 3]], np.int32)
  mask = np.ones_like(ids)
  positions = np.arange(ids.shape[1])[None]
  model = jaxrank.wrap(hf.module, targets=list(llama.ALL_TARGETS),
                       adapter=jaxrank.SoRA(rank=4))
  variables = model.init(jax.random.key(0), ids, mask, positions, return_dict=False)
  leaves, tree = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  lora = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  gates = jax.tree.map(lambda g: g.at[-1].set(0.0), variables["gates"])  # one dead rank each
  variables = {"params": hf.params, "lora": lora, "gates": gates}
  logits = np.asarray(model.apply(variables, ids, mask, positions, return_dict=False)[0])
  return folder, source, model, variables, (ids, mask), logits


def _by_name(path):
  reader = gguf.GGUFReader(str(path))
  return reader, {t.name: t for t in reader.tensors}


def test_gguf_keeps_the_source_layout_and_types(merged_setup):
  folder, source, model, variables, _, _ = merged_setup
  out = jaxrank.save_gguf(folder / "merged.gguf", model, variables, source=source)
  src_reader, src = _by_name(source)
  new_reader, new = _by_name(out)
  assert list(new) == list(src)  # same names, same order, no output.weight (tied)
  for name, tensor in src.items():
    assert new[name].tensor_type == tensor.tensor_type, name
    assert new[name].shape.tolist() == tensor.shape.tolist(), name
    if not name.startswith("blk.") or "norm" in name:  # no adapter there: the same bytes
      np.testing.assert_array_equal(new[name].data, tensor.data, err_msg=name)
  skip = ("GGUF.",)
  fields = lambda r: {f.name: f.contents() for f in r.fields.values() if not f.name.startswith(skip)}
  assert fields(new_reader) == fields(src_reader)

  # the merged tensors read back: exact for F32, F16-rounded for F16, and for the quantized
  # types exactly what gguf's own quantize -> dequantize gives, within half a block step
  config, _, _ = llama.read_gguf(source)
  expected = _gguf_export.flax_params_to_gguf(config, jaxrank.merge(model, variables))
  for name, tensor in new.items():
    back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected[name].shape)
    if tensor.tensor_type == Q.F32:
      np.testing.assert_array_equal(back, expected[name])
    elif tensor.tensor_type == Q.F16:
      np.testing.assert_array_equal(back, expected[name].astype(np.float16).astype(np.float32))
    else:
      requantized = gguf.quants.dequantize(gguf.quants.quantize(expected[name], tensor.tensor_type),
                                           tensor.tensor_type)
      np.testing.assert_array_equal(back, requantized.reshape(back.shape))
      blocks = expected[name].reshape(-1, 32)
      step = (blocks.max(1) - blocks.min(1))[:, None] / (15 if tensor.tensor_type == Q.Q4_1 else 127)
      assert np.all(np.abs(back.reshape(-1, 32) - blocks) <= step + 1e-6), name

  # jaxrank's loader maps the file back onto the merged params (within the same rounding)
  _, tensors, _ = llama.read_gguf(out)
  loaded = llama.gguf_to_flax_params(config, tensors)
  merged = jaxrank.merge(model, variables)
  np.testing.assert_array_equal(loaded["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"],
                                merged["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"])
  np.testing.assert_allclose(loaded["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"],
                             merged["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"],
                             atol=0.02)


@pytest.mark.parametrize("tensor_type", ["F32", "F16"])
def test_loader_gives_the_merged_model_logits_from_the_new_file(merged_setup, tensor_type):
  folder, source, model, variables, (ids, mask), logits = merged_setup
  out = jaxrank.save_gguf(folder / f"merged_{tensor_type}.gguf", model, variables,
                          source=source, tensor_type=tensor_type)
  reader, tensors = _by_name(out)
  assert {t.tensor_type for t in tensors.values()} == {Q[tensor_type]} | (
      {Q.F32} if tensor_type == "F16" else set())  # F16 keeps 1-D norms in F32 (ggml needs it)
  hf, _ = llama.load_smollm2(path=out)
  new_logits = np.asarray(llama.next_token_logits_fn(hf)(hf.params, ids, mask))
  merged = jaxrank.merge(model, variables)
  if tensor_type == "F16":  # every matrix rounded to float16 once, the norms exact
    merged = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32)
                          if x.ndim == 2 else x, merged)
  for a, b in zip(jax.tree.leaves(hf.params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(new_logits, logits, rtol=0, atol=1e-5 if tensor_type == "F32" else 0.1)


def test_bad_tensor_type_and_foreign_source_are_clear_errors(merged_setup, tmp_path):
  folder, source, model, variables, _, _ = merged_setup
  with pytest.raises(ValueError, match="tensor_type must be"):
    jaxrank.save_gguf(tmp_path / "x.gguf", model, variables, source=source, tensor_type="Q4_K")
  smaller = {**variables, "params": jax.tree.map(lambda x: x[..., :8] if x.ndim == 2 else x,
                                                 variables["params"])}
  with pytest.raises(ValueError, match="pass the GGUF these weights were loaded from"):
    jaxrank.save_gguf(tmp_path / "y.gguf", model.wrapped_model, {"params": smaller["params"]},
                      source=source)
