"""Parity of jaxrank.adalora with PEFT's AdaLoRA (AdaLoraModel.update_and_allocate).

A tiny torch MLP wrapped by PEFT and the same Flax MLP wrapped by jaxrank start from the same
base weights and the same P, Λ, Q. Every step torch computes the loss (MSE + PEFT's orthogonal
regulariser, added inside PEFT's forward) and its gradients; the *same* gradients drive both
PEFT (optimizer.step(); update_and_allocate(step)) and jaxrank (tx.update). jaxrank also computes
its own gradients, which must agree with torch's. Masks must be identical and Λ equal within
1e-5 at every step, through warmup, budgeting and the final phase.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrank
from jaxrank import AdaLoRA, adalora, adalora_rank_pattern as rank_pattern_from_state

torch = pytest.importorskip("torch", reason="parity test needs torch (pip install jaxrank[parity])")
peft = pytest.importorskip("peft", reason="parity test needs peft (pip install jaxrank[parity])")

DIMS = (6, 10, 8, 4)
NAMES = ("fc1", "fc2", "fc3")
CONFIG = dict(init_r=4, target_r=2, tinit=8, tfinal=14, total_step=60, deltaT=3,
              beta1=0.85, beta2=0.9)
ALPHA = 8.0
ORTH = 0.5


@dataclasses.dataclass
class Output:
  loss: "torch.Tensor"


class TorchMLP(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fc1 = torch.nn.Linear(DIMS[0], DIMS[1])
    self.fc2 = torch.nn.Linear(DIMS[1], DIMS[2])
    self.fc3 = torch.nn.Linear(DIMS[2], DIMS[3])

  def forward(self, x, y):
    h = torch.tanh(self.fc1(x))
    h = torch.tanh(self.fc2(h))
    return Output(loss=torch.mean((self.fc3(h) - y) ** 2))


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(DIMS[1], name="fc1")(x))
    h = nn.tanh(nn.Dense(DIMS[2], name="fc2")(h))
    return nn.Dense(DIMS[3], name="fc3")(h)


def _torch_factors(model):
  """PEFT's (lora_A, lora_E, lora_B) per layer as numpy."""
  out = {}
  for name in NAMES:
    layer = getattr(model.base_model.model, name)
    out[name] = tuple(
        getattr(layer, attr)["default"].detach().numpy().copy()
        for attr in ("lora_A", "lora_E", "lora_B"))
  return out


def _torch_grads(model):
  grads = {}
  for name in NAMES:
    layer = getattr(model.base_model.model, name)
    grads[name] = tuple(
        getattr(layer, attr)["default"].grad.detach().numpy().copy()
        for attr in ("lora_A", "lora_E", "lora_B"))
  return grads


def _to_jax_trainable(factors):
  """PEFT lora_A (r, in) = Q -> Q^T; lora_E (r, 1) -> (r,); lora_B (out, r) = P -> P^T."""
  return {
      "lora": {n: {"Q": jnp.asarray(a.T), "P": jnp.asarray(b.T)} for n, (a, _, b) in factors.items()},
      "gates": {n: {"singular_values": jnp.asarray(e[:, 0])} for n, (_, e, _) in factors.items()},
  }


def _setup(inner):
  torch.manual_seed(0)
  base = TorchMLP()
  config = peft.AdaLoraConfig(
      target_modules=list(NAMES), lora_alpha=ALPHA, orth_reg_weight=ORTH, lora_dropout=0.0,
      **CONFIG)
  model = peft.get_peft_model(base, config)
  with torch.no_grad():  # non-zero Λ so all three factors get gradient from step 0
    for name in NAMES:
      getattr(model.base_model.model, name).lora_E["default"].normal_(0.0, 0.1)
  trainable = [p for p in model.parameters() if p.requires_grad]
  if inner == "sgd":
    torch_opt = torch.optim.SGD(trainable, lr=0.5)
    jax_inner = optax.sgd(0.5)
  else:
    torch_opt = torch.optim.Adam(trainable, lr=0.01, eps=1e-8)
    jax_inner = optax.adam(0.01, eps=1e-8)

  flax_model = jaxrank.wrap(FlaxMLP(), targets=list(NAMES), adapter=AdaLoRA(rank=4, alpha=ALPHA))
  variables = flax_model.init(jax.random.key(0), jnp.ones((1, DIMS[0])))
  params = {
      n: {"kernel": jnp.asarray(getattr(base, n).base_layer.weight.detach().numpy().T),
          "bias": jnp.asarray(getattr(base, n).base_layer.bias.detach().numpy())}
      for n in NAMES
  }
  frozen = {"params": params}
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
  trainable_jax = _to_jax_trainable(_torch_factors(model))
  return model, torch_opt, flax_model, frozen, trainable_jax, jax_inner


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_masks_and_singular_values_match_peft(inner):
  model, torch_opt, flax_model, frozen, trainable, jax_inner = _setup(inner)
  tx = adalora(jax_inner, **CONFIG, compat="peft")
  state = tx.init(trainable)

  def loss_fn(t, x, y):
    variables = {**frozen, **t}
    mse = jnp.mean((flax_model.apply(variables, x) - y) ** 2)
    return mse + ORTH * jaxrank.orthogonality_penalty(flax_model, variables, form="peft")

  grad_fn = jax.jit(jax.grad(loss_fn))
  update_fn = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  events = 0
  kept_counts = []
  for step in range(CONFIG["total_step"]):
    x = rng.normal(size=(16, DIMS[0])).astype(np.float32)
    y = rng.normal(size=(16, DIMS[3])).astype(np.float32)
    torch_opt.zero_grad()
    # AdaLoraModel.forward adds the orthogonal regulariser (as PeftModelForXxx does).
    model.base_model(torch.from_numpy(x), torch.from_numpy(y)).loss.backward()
    torch_grads = _torch_grads(model)
    # jaxrank's own gradients at PEFT's current factors agree with PEFT's (forward, scale,
    # orth regulariser); evaluated at PEFT's factors so float drift between the two optimizers
    # does not enter.
    own = grad_fn(_to_jax_trainable(_torch_factors(model)), x, y)
    for n, (ga, ge, gb) in torch_grads.items():
      np.testing.assert_allclose(own["lora"][n]["Q"], ga.T, atol=1e-6, rtol=1e-4)
      np.testing.assert_allclose(own["gates"][n]["singular_values"], ge[:, 0], atol=1e-6, rtol=1e-4)
      np.testing.assert_allclose(own["lora"][n]["P"], gb.T, atol=1e-6, rtol=1e-4)
    torch_opt.step()
    model.base_model.update_and_allocate(step)

    grads = _to_jax_trainable(torch_grads)  # the same gradient sequence
    updates, state = update_fn(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)

    factors = _torch_factors(model)
    for n, (a, e, b) in factors.items():
      np.testing.assert_allclose(trainable["gates"][n]["singular_values"], e[:, 0], atol=1e-5,
                                 err_msg=f"Λ of {n} at step {step}")
      np.testing.assert_allclose(trainable["lora"][n]["Q"], a.T, atol=1e-5)
      np.testing.assert_allclose(trainable["lora"][n]["P"], b.T, atol=1e-5)
    # the EMAs Ī (eq. 9) and Ū (eq. 10) of every entry equal PEFT's
    allocator = model.base_model.rankallocator
    ours_state = jaxrank.find_adalora_state(state)
    for n in NAMES:
      for peft_name, part, to_jax in (("lora_A", "down", np.transpose),
                                       ("lora_E", "gate", lambda e: e[:, 0]),
                                       ("lora_B", "up", np.transpose)):
        key = f"{n}.{peft_name}.default"  # the allocator names parameters of the inner model
        for theirs, mine in ((allocator.exp_avg_ipt, ours_state.sensitivity),
                             (allocator.exp_avg_unc, ours_state.uncertainty)):
          want = to_jax(theirs[key].numpy()) if key in theirs else 0.0 * mine[n][part]
          np.testing.assert_allclose(mine[n][part], want, rtol=1e-3,
                                     atol=1e-4 * float(np.max(np.abs(want))) + 1e-12,
                                     err_msg=f"{peft_name} EMA of {n} at step {step}")
    peft_pattern = model.peft_config["default"].rank_pattern
    ours = rank_pattern_from_state(state)
    if peft_pattern is not None:
      for n in NAMES:
        (key,) = [k for k in peft_pattern if f".{n}.lora_E" in k or k.startswith(f"{n}.lora_E")]
        assert list(np.asarray(ours[n])) == list(peft_pattern[key]), (step, n)
      events += 1
    kept_counts.append(sum(int(np.sum(ours[n])) for n in NAMES))
  first_event = next(t for t in range(CONFIG["tinit"] + 1, 100) if t % CONFIG["deltaT"] == 0)
  assert events == CONFIG["total_step"] - first_event  # compared at every step from then on
  assert kept_counts[CONFIG["tinit"]] == 3 * CONFIG["init_r"]
  assert kept_counts[-1] == 3 * CONFIG["target_r"]
  # final phase: the pruned singular values stay exactly zero
  for n in NAMES:
    lam = np.asarray(trainable["gates"][n]["singular_values"])
    assert np.all(lam[~np.asarray(ours[n])] == 0.0)
