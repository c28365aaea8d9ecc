"""RoPE at the checkpoint's rope_theta: NNX LLaMA, the fixed Linen LLaMA and PyTorch agree."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxrank
from jaxrank.models import llama
from jaxrank.models import llama_nnx

torch = pytest.importorskip("torch", reason="install torch==2.13.0 and the 'parity' extra")
transformers = pytest.importorskip("transformers", reason="install the 'hf' extra")
if not hasattr(transformers, "FlaxLlamaForCausalLM"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

# rope_theta far from transformers' hard-coded 10000 (SmolLM2's is 100000)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=True)
IDS = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)


def _models(tmp_path):
  model = llama_nnx.LlamaForCausalLM(llama_nnx.LlamaConfig.from_dict(TINY), rngs=nnx.Rngs(0))
  # weights of std 0.2 instead of 0.02: attention far from uniform, so RoPE matters
  kernels = nnx.state(model, lambda path, _: path[-1] in ("kernel", "embedding"))
  nnx.update(model, jax.tree.map(lambda x: 10 * x, kernels))
  llama_nnx.save_pretrained(model, tmp_path / "hf")
  pt = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  params = jaxrank.nnx.to_linen_variables(model)["params"]
  params = {**params, "lm_head": {"kernel": params["model"]["embed_tokens"]["embedding"].T}}
  return model, pt, params


def _linen_logits(cls, params):
  module = cls(transformers.LlamaConfig(**TINY), _do_init=False).module
  mask = np.ones_like(IDS)
  positions = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
  return np.asarray(module.apply({"params": params}, IDS, mask, positions,
                                 return_dict=False)[0])


def test_nnx_linen_and_pytorch_logits_agree_at_rope_theta(tmp_path):
  model, pt, params = _models(tmp_path)
  assert pt.config.rope_theta == 500000.0 and pt.config.tie_word_embeddings
  with torch.no_grad():
    expected = pt(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  nnx_logits = np.asarray(model(IDS))
  linen_logits = _linen_logits(llama.causal_lm_class(), params)
  unfixed = _linen_logits(transformers.FlaxLlamaForCausalLM, params)
  nnx_diff = float(np.max(np.abs(nnx_logits - expected)))
  linen_diff = float(np.max(np.abs(linen_logits - expected)))
  unfixed_diff = float(np.max(np.abs(unfixed - expected)))
  print(f"max |logit - PyTorch|: NNX {nnx_diff:.2g}, fixed Linen {linen_diff:.2g}, "
        f"transformers' Flax (RoPE 10000) {unfixed_diff:.2g}")
  assert nnx_diff < 1e-4
  assert linen_diff < 1e-4
  assert float(np.max(np.abs(nnx_logits - linen_logits))) < 1e-4
  assert unfixed_diff > 1e-2  # the bug the subclass fixes is visible at this rope_theta


def test_fixed_class_keeps_params_and_adapts_with_wrap(tmp_path):
  model, _, params = _models(tmp_path)
  module = llama.causal_lm_class()(transformers.LlamaConfig(**TINY), _do_init=False).module
  shapes = jax.eval_shape(module.init, jax.random.key(0), IDS, np.ones_like(IDS),
                          np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape))["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  # jaxrank.wrap's interceptor and the RoPE interceptor stack: a zero-B LoRA changes nothing
  adapted = jaxrank.wrap(module, ["q_proj", "v_proj"], jaxrank.LoRA(rank=2))
  mask = np.ones_like(IDS)
  positions = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
  variables = adapted.init(jax.random.key(1), IDS, mask, positions, return_dict=False)
  out = adapted.apply({**variables, "params": params}, IDS, mask, positions, return_dict=False)[0]
  np.testing.assert_allclose(out, np.asarray(model(IDS)), atol=1e-4)


def test_rope_scaling_is_refused():
  config = transformers.LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})
  with pytest.raises(ValueError, match="rope_scaling"):
    llama.causal_lm_class()(config, _do_init=False)  # builds its param shapes: runs the model
