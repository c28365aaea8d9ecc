"""The merged LLaMA-family model as GGUF, in the layout of the GGUF it was loaded from.

:func:`save_gguf` folds every adapter into its kernel (:func:`jaxrank.merge`) and writes a
GGUF with the ``gguf`` package that llama.cpp (and :func:`jaxrank.models.llama.load_smollm2`)
reads: the source file's metadata copied field by field (``general.*``, ``llama.*``, the
tokenizer, the chat template), its tensors in its order under its names, and the inverse of
the loader's mapping (:mod:`jaxrank.models.llama`): Flax ``(in, out)`` kernels back to GGUF's
``(out, in)``, the ``attn_q``/``attn_k`` rows permuted again for llama.cpp's RoPE, ``lm_head``
as ``output.weight`` only where the source has one (or the adapted ``lm_head`` no longer
equals the tied embedding).

**Tensor types.** Each tensor is written in its source type where ``gguf.quants`` can
quantize it (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...); the k-quants and i-quants
(Q4_K, Q6_K, IQ*) that it can only read are written as F16 (matrices) or F32 (vectors).
Re-quantizing a merged matrix costs that type's rounding error again (SmolLM2's Q4_1: half
a step of each 32-weight block); ``tensor_type="F32"`` or ``"F16"`` writes every matrix in
that type instead (F32 is exact; the 1-D norms stay F32).

Example (needs the packages; ~20 s):
  >>> from jaxrank.models import llama
  >>> hf, _ = llama.load_smollm2()  # doctest: +SKIP
  >>> jaxrank.save_gguf("merged.gguf", hf.module, {"params": hf.params},  # doctest: +SKIP
  ...                   source=llama.smollm2_path())
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from jaxrank import _hf_checkpoint
from jaxrank.models import llama

_SKIPPED_FIELDS = ("GGUF.", "general.architecture")


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (HF layout -> GGUF), the inverse of
  :func:`jaxrank.models.llama.unpermute_rows`.

  >>> w = np.arange(8.0).reshape(4, 2)
  >>> bool(np.array_equal(llama.unpermute_rows(permute_rows(w, 1), 1), w))
  True
  """
  out, rest = weight.shape[0], weight.shape[1:]
  head_dim = out // n_head
  return weight.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def flax_params_to_gguf(config: dict, params) -> dict:
  """``{gguf_name: float32 (out, in)}`` of ``FlaxLlamaForCausalLM`` params: the inverse of
  :func:`jaxrank.models.llama.gguf_to_flax_params` (``output.weight`` is ``lm_head``)."""
  n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
  model = params["model"]
  tensors = {"token_embd.weight": model["embed_tokens"]["embedding"],
             "output_norm.weight": model["norm"]["weight"],
             "output.weight": np.asarray(params["lm_head"]["kernel"]).T}
  for i in range(config["num_hidden_layers"]):
    block = model["layers"][str(i)]
    tensors[f"blk.{i}.attn_norm.weight"] = block["input_layernorm"]["weight"]
    tensors[f"blk.{i}.ffn_norm.weight"] = block["post_attention_layernorm"]["weight"]
    for gguf_name, (group, name) in llama._BLOCK_NAMES.items():
      weight = np.asarray(block[group][name]["kernel"]).T
      if gguf_name == "attn_q":
        weight = permute_rows(weight, n_head)
      elif gguf_name == "attn_k":
        weight = permute_rows(weight, n_kv)
      tensors[f"blk.{i}.{gguf_name}.weight"] = weight
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}


def _encode(array: np.ndarray, qtype, forced):
  """``(data, type)``: ``array`` in ``forced`` or its source ``qtype``, else F16/F32."""
  import gguf
  if forced is not None:  # vectors (the norms) stay F32, as llama.cpp's converter keeps them
    qtype = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else forced
  try:
    return gguf.quants.quantize(array, qtype), qtype
  except NotImplementedError:  # a type gguf can read but not write (k-quants, i-quants)
    fallback = gguf.GGMLQuantizationType.F16 if array.ndim > 1 else gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(array, fallback), fallback


def save_gguf(path, model, variables, *, source, tensor_type: Optional[str] = None) -> Path:
  """Writes the merged model as a GGUF shaped like ``source``; returns ``path``.

  Args:
    path: the new ``.gguf`` file (its folder is created if missing).
    model: the model returned by :func:`jaxrank.wrap` over ``FlaxLlamaForCausalLM``'s module
      (or the module itself).
    variables: its variables (``params``, ``lora``, ``gates``).
    source: the GGUF the base weights were loaded from (:func:`jaxrank.models.llama.read_gguf`;
      SmolLM2's is :func:`jaxrank.models.llama.smollm2_path`).
    tensor_type: None (each tensor in its source type, see the module doc), ``"F32"`` or
      ``"F16"`` (every tensor in that type; ``general.file_type`` says so).

  Raises:
    ValueError: for an unknown ``tensor_type``, or when the merged tensors' shapes differ from
      the source's (another model's params).
  """
  import gguf
  forced = None
  if tensor_type is not None:
    if tensor_type not in ("F32", "F16"):
      raise ValueError(f"tensor_type must be None (the source's types), 'F32' or 'F16'; got "
                       f"{tensor_type!r}.")
    forced = gguf.GGMLQuantizationType[tensor_type]
  config, _, reader = llama.read_gguf(Path(source))
  merged = flax_params_to_gguf(config, _hf_checkpoint.merged_params(model, variables))
  sources = {t.name: t for t in reader.tensors}
  if "output.weight" not in sources and np.array_equal(merged["output.weight"],
                                                       merged["token_embd.weight"]):
    del merged["output.weight"]  # tied, as in the source
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  writer = gguf.GGUFWriter(str(path), arch=llama._field(reader, "general.architecture"))
  for field in reader.fields.values():
    if field.name.startswith(_SKIPPED_FIELDS):
      continue  # written by GGUFWriter itself
    value = field.contents()
    if field.name == gguf.Keys.General.FILE_TYPE and forced is not None:
      value = int(gguf.LlamaFileType.ALL_F32 if tensor_type == "F32"
                  else gguf.LlamaFileType.MOSTLY_F16)
    kind = field.types[0]
    sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, value, kind, sub_type=sub_type)
  names = [t.name for t in reader.tensors] + [n for n in merged if n not in sources]
  for name in names:
    if name not in merged:  # a tensor the loader does not map (e.g. rope_freqs): as it is
      tensor = sources[name]
      writer.add_tensor(name, tensor.data, raw_shape=tensor.data.shape,
                        raw_dtype=tensor.tensor_type)
      continue
    array = merged[name]
    like = sources.get(name, sources["token_embd.weight"])
    expected = tuple(reversed(like.shape.tolist()))
    if array.shape != expected:
      raise ValueError(f"save_gguf: merged {name} has shape {array.shape} but {source} holds "
                       f"{expected}; pass the GGUF these weights were loaded from.")
    data, qtype = _encode(array, like.tensor_type, forced)
    writer.add_tensor(name, data, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
