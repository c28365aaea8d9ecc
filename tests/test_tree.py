"""jaxrank._tree: path keys, adapter and gate lookup on any pytree, live ranks, global top-k."""

import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxrank
from jaxrank import _tree
from jaxrank import export


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.tanh(nn.Dense(5, name="hidden")(x)))


def _sora(rank=4, seed=0):
  model = jaxrank.wrap(MLP(), adapter=jaxrank.SoRA(rank=rank))
  variables = model.init(jax.random.key(seed), jnp.ones((1, 2)))
  gates = jax.tree.map(lambda g: jax.random.normal(jax.random.key(seed + 1), g.shape),
                       variables["gates"])
  return model, {**variables, "gates": gates}


# --- keys -----------------------------------------------------------------------------------------
def test_path_key_and_key_tuple_round_trip_with_the_root_guard():
  assert _tree.key_tuple("") == ()
  assert _tree.path_key(()) == ""
  assert _tree.key_tuple("encoder/layer/0/query") == ("encoder", "layer", "0", "query")
  for path in ("", "a", "a/b/0"):
    assert _tree.path_key(_tree.key_tuple(path)) == path
  assert _tree.leaf_key("lora", "", "A") == ("lora", "A")
  assert _tree.leaf_key("lora", "a/b", "A") == ("lora", "a", "b", "A")


def test_path_key_of_a_jax_key_path():
  flat, _ = jax.tree_util.tree_flatten_with_path({"a": [{"b": 1}]})
  keypath = flat[0][0]
  assert _tree.keypath_names(keypath) == ("a", "0", "b")
  assert _tree.path_key(keypath) == "a/0/b"


def test_keypath_names_drop_the_value_of_an_nnx_variable():

  class Gated(nnx.Module):

    def __init__(self):
      self.g = nnx.Param(jnp.ones(3))
      self.blocks = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])

  state = nnx.state(Gated())
  keys = sorted(_tree.leaves_by_key(state))
  assert keys == [("blocks", "0", "bias"), ("blocks", "0", "kernel"), ("g",)]
  assert [g.tolist() for g in _tree.named_leaves(state, "g")] == [[1.0, 1.0, 1.0]]


# --- gate leaves on any tree ----------------------------------------------------------------------
def test_named_leaves_on_full_trainable_frozen_and_masked_trees():
  model, variables = _sora()
  expected = sorted(np.asarray(g).tolist() for g in jax.tree.leaves(variables["gates"]))
  frozen, trainable = jaxrank.split_variables(variables)
  label = jaxrank.collection_labels(variables)
  masked_tree = jax.tree.map(lambda x, c: optax.MaskedNode() if c != "gates" else x,
                             variables, label)
  for tree in (variables, trainable, flax.core.freeze(variables), masked_tree):
    found = sorted(np.asarray(g).tolist() for g in _tree.named_leaves(tree, "g", "gates"))
    assert found == expected
  assert _tree.named_leaves(frozen, "g", "gates") == []
  assert _tree.named_leaves(variables["gates"], "g", "gates") == []  # collection not on path
  assert len(_tree.named_leaves(variables["gates"], "g")) == 2


def test_replace_leaves_keeps_structure_and_dtype():
  tree = {"a": {"b": jnp.zeros(2, jnp.bfloat16)}, "c": jnp.ones(1)}
  new = _tree.replace_leaves(tree, {("a", "b"): np.array([1.0, 2.0])})
  assert jax.tree.structure(new) == jax.tree.structure(tree)
  assert new["a"]["b"].dtype == jnp.bfloat16 and new["a"]["b"].tolist() == [1.0, 2.0]
  assert new["c"] is tree["c"]


# --- adapter layers and live ranks ----------------------------------------------------------------
def test_adapter_layers_in_path_order_with_root_layer():
  model, variables = _sora()
  assert list(_tree.adapter_layers(model, variables)) == ["hidden", "out"]
  assert jaxrank.adapter_layers is _tree.adapter_layers
  root = jaxrank.wrap(nn.Dense(4), adapter=jaxrank.LoRA(rank=2))
  layers = _tree.adapter_layers(root, root.init(jax.random.key(0), jnp.ones((1, 3))))
  assert list(layers) == [""] and layers[""].in_shape == (3,) and layers[""].num_matrices == 1


def test_adapter_layers_errors():
  model, variables = _sora()
  with pytest.raises(TypeError, match="jaxrank.wrap"):
    _tree.adapter_spec(object())
  with pytest.raises(ValueError, match="no 'lora' collection"):
    _tree.adapter_layers(model, {"params": variables["params"]})
  with pytest.raises(ValueError, match="lacks"):
    _tree.adapter_layers(model, {k: v for k, v in variables.items() if k != "gates"})
  with pytest.raises(ValueError, match="No AdaLoRA adapters"):
    _tree.adapter_layers(jaxrank.AdaLoRA(rank=4), variables)


def test_live_rank_total_and_num_matrices():
  model, variables = _sora(rank=4)
  gates = {"hidden": {"g": jnp.array([0.0, 1.0, 0.0, 2.0])},
           "out": {"g": jnp.array([1.0, 1.0, 1.0, 0.0])}}
  variables = {**variables, "gates": gates}
  assert _tree.live_rank_total(model, variables) == 5
  assert jaxrank.live_rank_total(model, variables) == 5
  assert _tree.num_matrices(model, variables) == 2

  class Stack(nn.Module):

    @nn.compact
    def __call__(self, x):
      body = nn.scan(lambda m, c, _: (nn.Dense(2, name="proj")(c), None),
                     variable_axes={"params": 0, "lora": 0, "gates": 0},
                     split_rngs={"params": True}, length=3)
      return body(self, x, None)[0]

  stacked = jaxrank.wrap(Stack(), adapter=jaxrank.SoRA(rank=2))
  stacked_vars = stacked.init(jax.random.key(0), jnp.ones((1, 2)))
  assert _tree.num_matrices(stacked, stacked_vars) == 3
  assert _tree.live_rank_total(stacked, stacked_vars) == 6


# --- global top-k on host ---------------------------------------------------------------------------
def test_top_k_masks_ties_in_path_order_and_dead_ranks_never_kept():
  scores = {"a": np.array([1.0, 3.0, np.nan]), "b": np.array([[3.0, -np.inf], [2.0, 1.0]])}
  masks = _tree.top_k_masks(scores, 3)
  assert masks["a"].tolist() == [False, True, False]
  assert masks["b"].tolist() == [[True, False], [True, False]]
  masks = _tree.top_k_masks(scores, 100)
  assert masks["a"].tolist() == [True, True, False]
  assert masks["b"].tolist() == [[True, False], [True, True]]
  assert not any(m.any() for m in _tree.top_k_masks(scores, 0).values())


def _reference_cap(model, variables, budget, gate_name, score, dropped):
  """cli.cap_to_budget as it was before _tree.keep_top_ranks replaced it."""
  layers = jaxrank.adapter_layers(model, variables)
  masks = jaxrank.rank_masks(model, variables)
  scores = np.concatenate([np.where(np.asarray(masks[p]), score(np.asarray(l.gates[gate_name])),
                                    -np.inf).reshape(-1) for p, l in layers.items()])
  keep = np.zeros(scores.shape, bool)
  keep[np.argsort(-scores, kind="stable")[:budget]] = True
  out, start = {}, 0
  for path, layer in layers.items():
    g = np.asarray(layer.gates[gate_name])
    out[path] = np.where(keep[start:start + g.size].reshape(g.shape), g, dropped(g))
    start += g.size
  return out


@pytest.mark.parametrize("budget_rank", [1, 2, 3])
def test_keep_top_ranks_matches_the_cli_cap(budget_rank):
  model, variables = _sora(rank=4, seed=3)
  capped = _tree.keep_top_ranks(model, variables, budget_rank, "g", score=np.abs,
                                dropped=np.zeros_like)
  assert _tree.live_rank_total(model, capped) == 2 * budget_rank
  expected = _reference_cap(model, variables, 2 * budget_rank, "g", np.abs, np.zeros_like)
  for path, layer in _tree.adapter_layers(model, capped).items():
    np.testing.assert_array_equal(np.asarray(layer.gates["g"]), expected[path])
  assert jax.tree.structure(capped["params"]) == jax.tree.structure(variables["params"])


def test_keep_top_ranks_leaves_a_model_under_budget_unchanged():
  model, variables = _sora(rank=4)
  assert _tree.keep_top_ranks(model, variables, 4, "g", score=np.abs,
                              dropped=np.zeros_like) is variables
  total = _tree.keep_top_ranks_total(model, variables, 3, "g", score=np.abs,
                                     dropped=np.zeros_like)
  assert _tree.live_rank_total(model, total) == 3


def test_keep_top_ranks_on_salora_closes_with_the_dropped_value():
  model = jaxrank.wrap(MLP(), adapter=jaxrank.SaLoRA(rank=4))
  variables = jaxrank.add_lagrange_multiplier(model.init(jax.random.key(0), jnp.ones((1, 2))))
  log_theta = {"hidden": {"log_theta": jnp.array([5.0, 4.0, 3.0, 2.0])},
               "out": {"log_theta": jnp.array([4.5, -9.0, 3.5, 1.0])}}
  variables = {**variables, "gates": {**variables["gates"], **log_theta}}
  capped = _tree.keep_top_ranks(model, variables, 2, "log_theta", score=lambda t: t,
                                dropped=lambda t: np.full_like(t, -50.0))
  pattern = jaxrank.rank_pattern(model, capped)
  assert pattern == {"hidden": 2, "out": 2}
  assert capped["gates"]["out"]["log_theta"].tolist() == [4.5, -50.0, 3.5, -50.0]
  assert float(capped["gates"]["lagrange_multiplier"]) == 0.0


# --- PEFT export of a compacted model: no second compaction -------------------------------------
def test_save_peft_adapter_does_not_compact_a_compacted_model(tmp_path, monkeypatch):
  pytest.importorskip("safetensors")
  model = jaxrank.wrap(MLP(), adapter=jaxrank.SoRA(rank=4))
  variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
  variables = {**variables,
               "lora": jax.tree.map(lambda x: x + 0.1, variables["lora"]),
               "gates": {"hidden": {"g": jnp.array([0.0, 1.0, 0.5, 0.0])},
                         "out": {"g": jnp.array([2.0, 0.0, 0.0, 0.0])}}}
  from_gated = jaxrank.save_peft_adapter(tmp_path / "gated", model, variables)
  lora_model, lora_vars, pattern = jaxrank.compact(model, variables)
  calls = []
  monkeypatch.setattr(export, "compact", lambda *a, **k: calls.append(a) or None)
  from_compacted = jaxrank.save_peft_adapter(tmp_path / "compacted", lora_model, lora_vars)
  assert calls == []
  assert from_compacted == from_gated and from_gated["rank_pattern"] == pattern
  from safetensors.numpy import load_file
  gated = load_file(str(tmp_path / "gated" / "adapter_model.safetensors"))
  compacted = load_file(str(tmp_path / "compacted" / "adapter_model.safetensors"))
  assert sorted(gated) == sorted(compacted)
  for name in gated:
    np.testing.assert_array_equal(gated[name], compacted[name])
  config = json.loads((tmp_path / "compacted" / "adapter_config.json").read_text())
  assert config["alpha_pattern"] == {"hidden": 2.0, "out": 1.0}
