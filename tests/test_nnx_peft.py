"""The PEFT adapter of an NNX LLaMA loads in PyTorch (transformers + peft) with the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrank
from jaxrank.models import llama_nnx

torch = pytest.importorskip("torch", reason="install torch==2.13.0 and the 'parity' extra")
peft = pytest.importorskip("peft", reason="install the 'parity' extra (peft)")
transformers = pytest.importorskip("transformers", reason="install the 'hf' extra")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=100000.0, max_position_embeddings=64, tie_word_embeddings=True)
IDS = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)


def _randomize_adapter(model, key, dead_gates: bool):
  """Non-zero factors (B starts at 0); SoRA gates with some exact zeros (dead ranks)."""
  lora = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree.flatten(lora)
  keys = jax.random.split(key, len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  if dead_gates:
    gates = nnx.state(model, jaxrank.nnx.Gate)
    leaves, tree = jax.tree.flatten(gates)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [
        jnp.where(jax.random.uniform(k, x.shape) < 0.4, 0.0, jax.random.normal(k, x.shape))
        for k, x in zip(keys, leaves)]))


@pytest.mark.parametrize("adapter,targets", [
    (jaxrank.LoRA(rank=4, alpha=8), "all-linear"),
    (jaxrank.SoRA(rank=4), ["q_proj", "v_proj", "down_proj"]),
], ids=["lora-all-linear", "sora-compacted"])
def test_nnx_peft_adapter_loads_in_pytorch(tmp_path, adapter, targets):
  model = llama_nnx.LlamaForCausalLM(llama_nnx.LlamaConfig.from_dict(TINY), rngs=nnx.Rngs(0))
  llama_nnx.save_pretrained(model, tmp_path / "base")  # the base, in Hugging Face format
  jaxrank.nnx.wrap(model, targets, adapter, rngs=nnx.Rngs(1))
  _randomize_adapter(model, jax.random.key(2), dead_gates=isinstance(adapter, jaxrank.SoRA))
  nnx_logits = np.asarray(model(IDS))

  config = jaxrank.save_peft_adapter(tmp_path / "adapter", jaxrank.nnx.adapter_of(model),
                                     jaxrank.nnx.to_linen_variables(model),
                                     task_type="CAUSAL_LM")
  pattern = jaxrank.nnx.rank_pattern(model)
  exported = {k.replace(".", "/"): v for k, v in config["rank_pattern"].items()}
  assert exported == {k: v for k, v in pattern.items() if v > 0}
  if isinstance(adapter, jaxrank.SoRA):
    assert sum(pattern.values()) < 4 * len(pattern)  # dead ranks were dropped on export

  base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
  with torch.no_grad():
    base_logits = base(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  with torch.no_grad():
    torch_logits = peft_model(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  diff = float(np.max(np.abs(torch_logits - nnx_logits)))
  print(f"{type(adapter).__name__}: max |PyTorch+PEFT - NNX| logit difference {diff:.2g}, "
        f"adapter moved the logits by {float(np.max(np.abs(base_logits - nnx_logits))):.2g}")
  assert diff < 1e-4
  assert float(np.max(np.abs(base_logits - nnx_logits))) > 1e-2  # the adapter does matter
