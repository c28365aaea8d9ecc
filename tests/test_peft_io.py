"""PEFT-format export that PyTorch loads, and PEFT adapters loaded into jaxrank."""

import jax
import numpy as np
import pytest

import jaxrank

torch = pytest.importorskip("torch", reason="install torch==2.13.0 and the 'parity' extra")
peft = pytest.importorskip("peft", reason="install the 'parity' extra (peft)")
transformers = pytest.importorskip("transformers", reason="install the 'hf' extra")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)


def _randomize(variables, key, scale=0.2):
  leaves, tree = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(key, len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return {**variables, "lora": jax.tree.unflatten(tree, new)}


def _bert(tmp_path):
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32, num_labels=3)
  pt = transformers.BertForSequenceClassification(config).eval()
  pt.save_pretrained(tmp_path / "base")
  fx = transformers.FlaxBertForSequenceClassification.from_pretrained(tmp_path / "base", from_pt=True)
  ids = np.array([[2, 5, 7, 9, 3, 11]])
  args = (ids, np.ones_like(ids), np.zeros_like(ids), np.arange(6)[None], None)
  return pt, fx, ids, args, ["query", "value", "intermediate/dense"], "SEQ_CLS", ["classifier"]


def _llama(tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
  pt = transformers.LlamaForCausalLM(config).eval()
  pt.save_pretrained(tmp_path / "base")
  fx = transformers.FlaxLlamaForCausalLM.from_pretrained(tmp_path / "base", from_pt=True)
  ids = np.array([[2, 5, 7, 9, 3, 11]])
  args = (ids, np.ones_like(ids), np.arange(6)[None])
  return pt, fx, ids, args, "all-linear", "CAUSAL_LM", []


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_exported_adapter_loads_in_peft_with_same_outputs(tmp_path, build):
  pt, fx, ids, args, targets, task, head = build(tmp_path)
  model = jaxrank.wrap(fx.module, targets=targets, adapter=jaxrank.LoRA(rank=4, alpha=8))
  variables = model.init(jax.random.key(0), *args, return_dict=False)
  variables = _randomize({**variables, "params": fx.params}, jax.random.key(1))
  first = sorted(jaxrank.rank_pattern(model, variables))[0]
  flax_logits = np.asarray(model.apply(variables, *args, return_dict=False)[0])

  # A trained head: change it so the test sees whether it travels.
  if head:
    variables["params"] = jax.tree.map(lambda x: x, variables["params"])
    variables["params"]["classifier"]["bias"] = variables["params"]["classifier"]["bias"] + 0.5
    flax_logits = np.asarray(model.apply(variables, *args, return_dict=False)[0])
  config = jaxrank.save_peft_adapter(tmp_path / "adapter", model, variables, task_type=task,
                                     modules_to_save=head)
  assert set(config["rank_pattern"].values()) == {4}
  peft_model = peft.PeftModel.from_pretrained(pt, tmp_path / "adapter").eval()
  with torch.no_grad():
    torch_logits = peft_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(torch_logits, flax_logits, rtol=1e-4, atol=1e-4)
  assert first.replace("/", ".") in config["target_modules"]

  # The reverse: the PEFT adapter read back into jaxrank gives the same outputs.
  adapter, lora = jaxrank.load_peft_adapter(tmp_path / "adapter")
  back = jaxrank.wrap(fx.module, targets=targets, adapter=adapter)
  out = back.apply({"params": variables["params"], "lora": lora}, *args, return_dict=False)[0]
  np.testing.assert_allclose(out, flax_logits, rtol=1e-4, atol=1e-5)


def test_peft_made_adapter_loads_into_jaxrank(tmp_path):
  pt, fx, ids, args, _, _, _ = _bert(tmp_path)
  config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["query", "value"],
                           rank_pattern={"layer.0.attention.self.query": 2}, init_lora_weights=False)
  peft_model = peft.get_peft_model(pt, config).eval()
  peft_model.save_pretrained(tmp_path / "peft")
  with torch.no_grad():
    expected = peft_model(torch.tensor(ids)).logits.numpy()
  adapter, lora = jaxrank.load_peft_adapter(tmp_path / "peft")
  assert lora["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["A"].shape == (16, 2)
  model = jaxrank.wrap(fx.module, targets=["query", "value"], adapter=adapter)
  out = model.apply({"params": fx.params, "lora": lora}, *args, return_dict=False)[0]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
