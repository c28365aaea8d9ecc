"""Local Hugging Face folders as transformers itself would load them.

* a LLaMA folder at a non-default ``rope_theta`` gives PyTorch's logits (the RoPE-fixed class
  of :func:`jaxrank.models.llama.causal_lm_class`, not transformers' Flax LLaMA at 10000);
* a BERT folder whose saved classifier has another ``num_labels`` than the data loads as
  ``ignore_mismatched_sizes=True`` does: pretrained encoder, fresh classifier of the data's
  size, and a warning naming the mismatch.
"""

import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the tiny folders are written with torch (parity)")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

import jaxrank  # noqa: E402
from jaxrank import _local_models  # noqa: E402
import hf_dirs  # noqa: E402

IDS = np.random.default_rng(0).integers(3, len(hf_dirs.WORDS) + 3, (2, 20)).astype(np.int32)


def _llama_logits(module, params):
  positions = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
  return np.asarray(module.apply({"params": params}, IDS, np.ones_like(IDS), positions,
                                 return_dict=False)[0])


def test_local_llama_folder_at_rope_theta_matches_pytorch(tmp_path):
  folder = hf_dirs.save_tiny_llama(tmp_path / "llama", rope_theta=500000.0,
                                   initializer_range=0.2)
  local = _local_models.load_local_model(folder)
  assert local.family == "llama" and local.config.rope_theta == 500000.0
  pt = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
  with torch.no_grad():
    expected = pt(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  logits = _llama_logits(local.module, local.params)
  # transformers' own Flax LLaMA (RoPE at 10000) on the same weights: what the fix avoids
  unfixed = _llama_logits(transformers.FlaxLlamaForCausalLM(local.config, _do_init=False).module,
                          local.params)
  diff, unfixed_diff = (float(np.max(np.abs(x - expected))) for x in (logits, unfixed))
  print(f"max |logit - PyTorch|: jaxrank {diff:.2g}, transformers' Flax {unfixed_diff:.2g}")
  assert diff < 1e-4
  assert unfixed_diff > 1e-3  # rope_theta matters for these weights


def test_local_llama_folder_with_rope_scaling_is_refused(tmp_path):
  import json
  folder = hf_dirs.save_tiny_llama(tmp_path / "llama")
  config = json.loads((folder / "config.json").read_text())
  config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="rope_scaling"):
    _local_models.load_local_model(folder)


def test_bert_folder_with_a_3_way_classifier_on_2_class_data(tmp_path):
  folder = hf_dirs.save_tiny_bert(tmp_path / "bert3", num_labels=3)
  assert _local_models.saved_classifier_size(folder) == 3
  with pytest.warns(UserWarning, match="saved classifier has 3 outputs but the data has 2"):
    local = _local_models.load_local_model(folder, num_labels=2, seed=0)
  assert local.config.num_labels == 2 and len(local.config.id2label) == 2
  assert local.params["classifier"]["kernel"].shape == (16, 2)
  assert local.head == ("classifier",)  # the saved pooler loaded: it stays frozen
  # the encoder and pooler are the checkpoint's (PyTorch names, transposed kernels) ...
  pt = transformers.BertForSequenceClassification.from_pretrained(folder)
  np.testing.assert_array_equal(
      local.params["bert"]["embeddings"]["word_embeddings"]["embedding"],
      pt.bert.embeddings.word_embeddings.weight.detach().numpy())
  np.testing.assert_array_equal(local.params["bert"]["pooler"]["dense"]["kernel"],
                                pt.bert.pooler.dense.weight.detach().numpy().T)
  # ... the classifier is the seeded fresh one that a 2-class model initialises
  config = transformers.BertConfig.from_pretrained(folder, num_labels=2)
  fresh = transformers.FlaxBertForSequenceClassification(config, seed=0).params["classifier"]
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(local.params["classifier"][name], fresh[name], atol=1e-7)
  # and the whole model runs at the new size: PyTorch's encoder output through the new head
  ids = IDS[:, :12] % 31
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  logits = local.module.apply({"params": local.params}, ids, np.ones_like(ids),
                              np.zeros_like(ids), positions, None, return_dict=False)[0]
  with torch.no_grad():
    pooled = pt.bert(torch.tensor(ids, dtype=torch.long)).pooler_output.numpy()
  expected = pooled @ np.asarray(fresh["kernel"]) + np.asarray(fresh["bias"])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


def test_bert_folder_with_a_classifier_of_the_right_size_keeps_it(tmp_path):
  folder = hf_dirs.save_tiny_bert(tmp_path / "bert3", num_labels=3)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # no mismatch, no warning
    local = _local_models.load_local_model(folder, num_labels=3)
  pt = transformers.BertForSequenceClassification.from_pretrained(folder)
  np.testing.assert_allclose(local.params["classifier"]["kernel"],
                             pt.classifier.weight.detach().numpy().T, atol=1e-7)
  assert _local_models.saved_classifier_size(hf_dirs.save_tiny_bert(tmp_path / "enc")) is None


def test_finetune_texts_on_a_3_way_checkpoint_with_2_classes(tmp_path):
  folder = hf_dirs.save_tiny_bert(tmp_path / "bert3", num_labels=3)
  texts = ["good great film", "bad awful plot", "nice happy day", "sad poor story"] * 6
  labels = ["pos", "neg", "pos", "neg"] * 6
  with pytest.warns(UserWarning, match="fresh 2-way classifier"):
    run = jaxrank.finetune_texts(str(folder), "lora", (texts, labels), steps=3, batch_size=4,
                                 max_length=8, progress=False)
  assert run.label_names == ("neg", "pos")
  assert run.result.variables["params"]["classifier"]["kernel"].shape == (16, 2)
  assert 0.0 <= run.result.final_metrics["eval_accuracy"] <= 1.0


def test_saved_classifier_size_of_bin_and_flax_checkpoints(tmp_path):
  folder = hf_dirs.save_tiny_bert(tmp_path / "bert3", num_labels=3)
  pt = transformers.BertForSequenceClassification.from_pretrained(folder)
  for name, save in (("bin", lambda f: pt.save_pretrained(f, safe_serialization=False)),
                     ("flax", lambda f: transformers.FlaxBertForSequenceClassification
                      .from_pretrained(folder, from_pt=True).save_pretrained(f))):
    other = tmp_path / name
    shutil.copytree(folder, other, ignore=shutil.ignore_patterns("model.safetensors"))
    save(other)
    assert not (other / "model.safetensors").exists()
    assert _local_models.saved_classifier_size(other) == 3, name
    with pytest.warns(UserWarning, match="saved classifier has 3 outputs"):
      local = _local_models.load_local_model(other, num_labels=2)
    assert local.params["classifier"]["bias"].shape == (2,), name
