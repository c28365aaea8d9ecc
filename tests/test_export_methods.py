"""Export for every method: compact, merge and a PEFT adapter that PyTorch loads."""

import jax
import numpy as np
import pytest

import jaxrank
import method_configs
import toy_training

METHODS = sorted(m for m in method_configs.CONFIGS if m != "lora_dropout")
STEPS = 24


def _trained(method):
  config = method_configs.CONFIGS[method](STEPS)
  model, frozen, state, (x_all, y_all) = toy_training.setup(config, STEPS)
  step = jax.jit(toy_training.make_step(config, model))
  for i in range(STEPS):
    state = step(state, frozen, x_all[i], y_all[i])
  variables = jaxrank.join_variables(frozen, state["trainable"])
  if method == "salora":
    variables = jaxrank.salora_harden(model, variables)
  return model, variables, x_all[0]


@pytest.fixture(scope="module", params=METHODS)
def trained(request):
  return (request.param, *_trained(request.param))


def test_compact_and_merge_keep_the_function(trained):
  method, model, variables, x = trained
  expected = np.asarray(model.apply(variables, x))
  lora_model, compacted, pattern = jaxrank.compact(model, variables)
  assert pattern == jaxrank.rank_pattern(model, variables)
  assert "gates" not in compacted
  np.testing.assert_allclose(lora_model.apply(compacted, x), expected, rtol=1e-5, atol=1e-6)
  merged = jaxrank.merge(model, variables)
  np.testing.assert_allclose(toy_training.MLP().apply({"params": merged}, x), expected,
                             rtol=1e-5, atol=1e-6)


def test_peft_adapter_loads_in_pytorch(trained, tmp_path):
  torch = pytest.importorskip("torch", reason="install torch==2.13.0 and the 'parity' extra")
  peft = pytest.importorskip("peft", reason="install the 'parity' extra (peft)")
  method, model, variables, x = trained
  pattern = jaxrank.rank_pattern(model, variables)
  if not any(pattern.values()):
    pytest.skip(f"{method}: every rank died in this short run; nothing to export")

  class MLP(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.hidden = torch.nn.Linear(toy_training.FEATURES, 8)
      self.out = torch.nn.Linear(8, toy_training.OUTPUTS)

    def forward(self, x):
      return self.out(torch.tanh(self.hidden(x)))

  torch_model = MLP()
  with torch.no_grad():
    for name in ("hidden", "out"):
      layer = getattr(torch_model, name)
      layer.weight.copy_(torch.tensor(np.asarray(variables["params"][name]["kernel"]).T))
      layer.bias.copy_(torch.tensor(np.asarray(variables["params"][name]["bias"])))
  config = jaxrank.save_peft_adapter(tmp_path, model, variables)
  assert config["rank_pattern"] == {k: v for k, v in pattern.items() if v}
  loaded = peft.PeftModel.from_pretrained(torch_model, tmp_path).eval()
  with torch.no_grad():
    out = loaded(torch.tensor(np.asarray(x))).numpy()
  np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-4, atol=1e-5)
