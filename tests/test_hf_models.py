"""Adapters on Hugging Face Flax models (transformers 4.57.x) through ``model.module``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrank

transformers = pytest.importorskip(
    "transformers", reason="install the 'hf' extra (transformers>=4.57,<5) for these tests"
)
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)


def _randomize(variables, key):
  leaves, tree = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(key, len(leaves))
  new = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return {**variables, "lora": jax.tree.unflatten(tree, new)}


def _bert():
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32, num_labels=3,
  )
  return transformers.FlaxBertForSequenceClassification(config, seed=0)


def _llama():
  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
  )
  return transformers.FlaxLlamaForCausalLM(config, seed=0)


def test_bert_sequence_classification():
  hf = _bert()
  ids = jnp.array([[1, 5, 7, 9, 2, 0], [1, 3, 4, 2, 0, 0]])
  mask = (ids != 0).astype(jnp.int32)
  kwargs = dict(attention_mask=mask, token_type_ids=jnp.zeros_like(ids),
                position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
                head_mask=None, return_dict=False)
  model = jaxrank.wrap(hf.module, targets=["query", "value"], adapter=jaxrank.LoRA(rank=4))
  variables = jax.jit(lambda k: model.init(k, ids, **kwargs))(jax.random.key(0))
  pattern = jaxrank.rank_pattern(model, variables)
  assert sorted(pattern) == [
      f"bert/encoder/layer/{i}/attention/self/{n}" for i in range(2) for n in ("query", "value")
  ]
  variables = {**variables, "params": hf.params}  # the pretrained weights
  logits = jax.jit(lambda v: model.apply(v, ids, **kwargs)[0])(variables)
  np.testing.assert_allclose(logits, hf(ids, **{k: v for k, v in kwargs.items() if k != "return_dict"}).logits,
                             rtol=1e-5, atol=1e-5)

  variables = _randomize(variables, jax.random.key(1))
  frozen, trainable = jaxrank.split_variables(variables)

  @jax.jit
  def loss_and_grads(trainable, rng):
    def loss(t):
      out = model.apply(jaxrank.join_variables(frozen, t), ids, deterministic=False,
                        rngs={"dropout": rng}, **kwargs)[0]
      return -jnp.mean(jax.nn.log_softmax(out)[:, 0])
    return jax.value_and_grad(loss)(trainable)

  loss, grads = loss_and_grads(trainable, jax.random.key(2))
  assert np.isfinite(loss)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))

  adapted = jax.jit(lambda v: model.apply(v, ids, **kwargs)[0])(variables)
  merged = jaxrank.merge(model, variables)
  merged_logits = hf(ids, params=merged, **{k: v for k, v in kwargs.items() if k != "return_dict"}).logits
  np.testing.assert_allclose(merged_logits, adapted, rtol=1e-4, atol=1e-5)


def test_llama_causal_lm_all_linear():
  hf = _llama()
  ids = jnp.array([[1, 5, 7, 9, 2, 3]])
  mask = jnp.ones_like(ids)
  pos = jnp.arange(ids.shape[1])[None]
  model = jaxrank.wrap(hf.module, targets="all-linear", adapter=jaxrank.LoRA(rank=2))
  variables = jax.jit(lambda k: model.init(k, ids, mask, pos, return_dict=False))(jax.random.key(0))
  pattern = jaxrank.rank_pattern(model, variables)
  assert "lm_head" not in pattern  # the output head stays out of "all-linear", as in PEFT
  assert len(pattern) == 2 * 7  # q, k, v, o, gate, up, down per layer
  variables = {**variables, "params": hf.params}
  apply = jax.jit(lambda v: model.apply(v, ids, mask, pos, return_dict=False)[0])
  np.testing.assert_allclose(apply(variables), hf(ids, mask, pos).logits, rtol=1e-5, atol=1e-5)
  variables = _randomize(variables, jax.random.key(3))
  merged = jaxrank.merge(model, variables)
  np.testing.assert_allclose(hf(ids, mask, pos, params=merged).logits, apply(variables),
                             rtol=1e-4, atol=1e-5)


def test_bert_with_gradient_checkpointing():
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=32,
  )
  hf = transformers.FlaxBertModel(config, seed=0, gradient_checkpointing=True)
  ids = jnp.array([[1, 5, 7, 9]])
  args = (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(4)[None], None)
  model = jaxrank.wrap(hf.module, targets=["query", "value"], adapter=jaxrank.LoRA(rank=2))
  variables = model.init(jax.random.key(0), *args, return_dict=False)
  variables = _randomize({**variables, "params": hf.params}, jax.random.key(1))
  grads = jax.jit(jax.grad(lambda l: jnp.sum(model.apply({**variables, "lora": l}, *args,
                                                           return_dict=False)[0])))(variables["lora"])
  assert len(jax.tree.leaves(grads)) == 8
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
