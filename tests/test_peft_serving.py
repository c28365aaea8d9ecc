"""Serving-safe PEFT adapters: a loader that reads only ``r``, ``lora_alpha`` and the tensor
shapes (as vLLM does) computes what PEFT computes with ``rank_pattern``/``alpha_pattern``.

Every method's adapter is given mixed ranks and one layer whose every rank is dead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxrank

torch = pytest.importorskip("torch", reason="install torch==2.13.0 and the 'parity' extra")
peft = pytest.importorskip("peft", reason="install the 'parity' extra (peft)")
transformers = pytest.importorskip("transformers", reason="install the 'hf' extra")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

RANK = 4
TARGETS = ["query", "value", "intermediate/dense"]
ADAPTERS = {
    "sora": lambda: jaxrank.SoRA(rank=RANK),
    "adalora": lambda: jaxrank.AdaLoRA(rank=RANK),
    "alora": lambda: jaxrank.ALoRA(rank=RANK, initial_rank=2),
    "salora": lambda: jaxrank.SaLoRA(rank=RANK),
}


def _gate_values(name: str, alive: int, rng) -> np.ndarray:
  """A gate of RANK entries whose first ``alive`` ranks live, with varied magnitudes."""
  live = np.arange(RANK) < alive
  if name == "mask":  # ALoRA: 0/1
    return live.astype(np.float32)
  if name == "log_theta":  # SaLoRA: +6 -> gate 1, 0 -> 0.5, -10 -> 0
    return np.where(live, rng.choice([6.0, 0.0], RANK), -10.0).astype(np.float32)
  return np.where(live, rng.uniform(0.3, 2.0, RANK) * rng.choice([-1, 1], RANK), 0.0
                  ).astype(np.float32)  # SoRA g, AdaLoRA singular values


def _mixed_ranks(variables, seed=0):
  """Random factors; layer i keeps ``i % (RANK + 1)`` ranks (layer 0 keeps none)."""
  rng = np.random.default_rng(seed)
  lora = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                      variables["lora"])
  flat = jax.tree_util.tree_flatten_with_path(variables["gates"])[0]
  gates = {}
  for i, (path, leaf) in enumerate(flat):
    keys = [p.key for p in path]
    values = _gate_values(keys[-1], i % (RANK + 1), rng).reshape(leaf.shape)
    node = gates
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jnp.asarray(values, leaf.dtype)
  return {**variables, "lora": lora, "gates": gates}


def _serving_merge(pt_model, directory):
  """What a serving engine does: one ``lora_alpha / r`` for every module, each module's
  factors zero-padded to ``r``; ``rank_pattern``/``alpha_pattern`` are never read."""
  import json
  config = json.loads((directory / "adapter_config.json").read_text())
  scale = config["lora_alpha"] / config["r"]
  tensors = load_file(str(directory / "adapter_model.safetensors"))
  state = {k: v.clone() for k, v in pt_model.state_dict().items()}
  for key, a in tensors.items():
    if not key.endswith(".lora_A.weight"):
      continue
    b = tensors[key.replace("lora_A", "lora_B")]
    assert a.shape[0] <= config["r"]
    a_pad = np.zeros((config["r"], a.shape[1]), np.float32)
    b_pad = np.zeros((b.shape[0], config["r"]), np.float32)
    a_pad[:a.shape[0]], b_pad[:, :b.shape[1]] = a, b
    weight = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
    state[weight] += torch.tensor(scale * b_pad @ a_pad)
  merged = type(pt_model)(pt_model.config).eval()
  merged.load_state_dict(state)
  return merged


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32, num_labels=3)
  folder = tmp_path_factory.mktemp("bert")
  transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
  fx = transformers.FlaxBertForSequenceClassification.from_pretrained(folder, from_pt=True)
  return folder, fx


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_r_and_lora_alpha_alone_give_peft_outputs(tiny_bert, method, tmp_path):
  folder, fx = tiny_bert
  ids = np.array([[2, 5, 7, 9, 3, 11, 40, 1], [2, 8, 8, 30, 12, 3, 0, 0]])
  mask = (ids > 0).astype(np.int32)
  args = (ids, mask, np.zeros_like(ids), np.broadcast_to(np.arange(8), ids.shape), None)
  model = jaxrank.wrap(fx.module, targets=TARGETS, adapter=ADAPTERS[method]())
  variables = model.init(jax.random.key(0), *args, return_dict=False)
  variables = _mixed_ranks({**variables, "params": fx.params})
  pattern = jaxrank.rank_pattern(model, variables)
  assert 0 in pattern.values() and len(set(pattern.values()) - {0}) >= 2, pattern

  config = jaxrank.save_peft_adapter(tmp_path, model, variables, task_type="SEQ_CLS",
                                     modules_to_save=["classifier"])
  dead = {p.replace("/", ".") for p, r in pattern.items() if r == 0}
  assert dead and not dead & set(config["target_modules"])
  assert config["r"] == max(pattern.values()) == config["lora_alpha"]
  assert not config["use_rslora"]

  base = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
  with torch.no_grad():
    peft_logits = peft.PeftModel.from_pretrained(base, tmp_path).eval()(
        torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    base = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    serving_logits = _serving_merge(base, tmp_path)(
        torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(serving_logits, peft_logits, rtol=0, atol=1e-5)
  jax_logits = np.asarray(model.apply(variables, *args, return_dict=False)[0])
  np.testing.assert_allclose(peft_logits, jax_logits, rtol=0, atol=1e-4)
