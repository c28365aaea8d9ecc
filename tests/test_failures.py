"""No silent failure (issue 17): bad input gets a clear error naming the problem and the fix;
a NaN never turns into a rank decision; nothing learned is lost."""

import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrank
from jaxrank import _report
from jaxrank import recipes
from jaxrank import train
from test_train import Net, _data, _task, _variables

BATCH = 16


def _fit(data, **kwargs):
  kwargs = {"steps": 6, "batch_size": BATCH, "head": ("classifier",), "learning_rate": 1e-2,
            "progress": False, **kwargs}
  return train.fit(Net(), _variables(), recipes.lora_recipe(rank=2), _task(), train_data=data,
                   **kwargs)


def _nan_at_step(step, n=96, seed=0):
  """Training data whose batch of ``step`` (1-based, first epoch) holds one NaN row."""
  data = _data(n)
  order = np.random.default_rng(seed).permutation(n)
  data["x"][order[(step - 1) * BATCH + 3]] = np.nan
  return data


# --- 1. NaN losses ------------------------------------------------------------------------
def test_fit_stops_at_a_nan_loss_and_keeps_the_last_finite_state():
  with pytest.raises(FloatingPointError) as info:
    _fit(_nan_at_step(3))
  error = info.value
  assert isinstance(error, jaxrank.NonFiniteError)
  message = str(error)
  assert "step 3" in message and "learning rate" in message and "data" in message
  assert error.step == 3
  assert int(error.state.step) == 2  # the two finite steps are kept
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(error.state.trainable))


def test_fit_nan_at_the_first_step_keeps_the_initial_state():
  data = _data()
  data["x"][:] = np.nan
  with pytest.raises(jaxrank.NonFiniteError, match="step 1") as info:
    _fit(data)
  assert int(info.value.state.step) == 0


def test_fit_raises_on_non_finite_eval_metrics():
  eval_data = _data(40)
  eval_data["x"][7] = np.nan
  with pytest.raises(jaxrank.NonFiniteError, match="eval_loss") as info:
    _fit(_data(), eval_data=eval_data, eval_every=2)
  assert info.value.step == 2 and int(info.value.state.step) == 2


def test_run_one_checkpoints_the_last_finite_state_before_raising(tmp_path):
  setup = types.SimpleNamespace(base=Net(), variables=_variables(), task=_task(),
                                train_data=_nan_at_step(4), eval_data=None, test_data=None,
                                head=("classifier",), targets="all-linear")
  with pytest.raises(jaxrank.NonFiniteError) as info:
    _report.run_one(setup, recipes.lora_recipe(rank=2), steps=6, batch_size=BATCH,
                    learning_rate=1e-2, head_learning_rate=None, eval_every=0, seed=0,
                    output_dir=tmp_path, progress=False)
  assert jaxrank.checkpoint.latest_step(tmp_path / "checkpoint") == 3
  assert "checkpoint" in str(info.value)


# --- 5. argument validation in fit ------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
                                          ({"eval_every": -1}, "eval_every"),
                                          ({"eval_batch_size": -2}, "eval_batch_size")])
def test_fit_validates_its_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    _fit(_data(), eval_data=_data(), **kwargs)


def test_batches_docstring_says_the_partial_batch_is_dropped():
  assert "dropped" in train.batches.__doc__
  assert len(list(zip(range(3), train.batches({"x": np.arange(5)}, 2, shuffle=False)))) == 3


# --- 6. validation batch ----------------------------------------------------------------------
def test_fit_checks_the_eval_data_against_the_training_batch():
  bad = {"x": np.zeros((32, 7), np.float32), "labels": np.zeros((32,), np.int32)}
  with pytest.raises(ValueError, match=r"eval_data\['x'\].*\(7,\).*\(5,\)"):
    _fit(_data(), eval_data=bad)
  with pytest.raises(ValueError, match="labels"):
    _fit(_data(), eval_data={"x": np.zeros((32, 5), np.float32)})


# --- 3. adapter / variables mismatch -------------------------------------------------------------
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="out")(nn.tanh(nn.Dense(16, name="hidden")(x)))


def test_apply_rejects_variables_of_another_rank():
  x = jnp.ones((2, 16))
  small = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2))
  variables = small.init(jax.random.key(0), x)
  big = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=4))
  with pytest.raises(ValueError, match=r"lora/hidden/A.*\(16, 4\).*\(16, 2\).*rank") as info:
    big.apply(variables, x)
  assert "LoRA(rank=2" in str(info.value) or "rank 2" in str(info.value)


def test_apply_rejects_variables_of_another_width():
  variables = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2)).init(jax.random.key(0),
                                                                    jnp.ones((2, 16)))
  variables = jax.tree.map(lambda a: a, variables)
  variables["lora"]["hidden"]["A"] = jnp.zeros((8, 2))
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2))
  with pytest.raises(ValueError, match=r"lora/hidden/A.*\(16, 2\).*\(8, 2\)"):
    model.apply(variables, jnp.ones((2, 16)))


def test_compacted_and_peft_loaded_models_still_apply(tmp_path):
  model = jaxrank.wrap(MLP(), adapter=jaxrank.SoRA(rank=4))
  x = jnp.ones((2, 16))
  variables = model.init(jax.random.key(0), x)
  variables["gates"]["hidden"]["g"] = jnp.array([1.0, 0.0, 0.5, 0.0])
  lora_model, compacted, pattern = jaxrank.compact(model, variables)
  assert pattern == {"hidden": 2, "out": 4}
  np.testing.assert_allclose(lora_model.apply(compacted, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-6)


def test_rank_above_the_layer_size_warns_naming_the_layer_and_the_max():
  """A warning, not an error: existing tests (test_train.test_fit_takes_a_recipe_name) train
  rank 8 on a 5 x 8 kernel and assert the pattern says 8."""
  from jaxrank._wrap import RankExceedsLayerWarning
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=8))  # out is 16 x 4
  with pytest.warns(RankExceedsLayerWarning, match=r"rank 8.*'out'.*16 x 4.*at most 4"):
    model.init(jax.random.key(0), jnp.ones((1, 16)))


def test_alpha_zero_is_rejected():
  with pytest.raises(ValueError, match="alpha"):
    jaxrank.LoRA(rank=2, alpha=0.0)
  with pytest.raises(ValueError, match="alpha"):
    jaxrank.LoRA(rank=2, alpha=float("nan"))


# --- 3/4. PEFT adapters ---------------------------------------------------------------------------
def _peft_dir(tmp_path):
  pytest.importorskip("safetensors")
  model = jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=2))
  variables = model.init(jax.random.key(0), jnp.ones((1, 16)))
  jaxrank.save_peft_adapter(tmp_path, model, variables)
  return model, variables


def test_save_peft_rejects_two_layers_mapped_to_one_name(tmp_path):
  model, variables = _peft_dir(tmp_path)
  with pytest.raises(ValueError, match=r"hidden.*out.*'proj'|out.*hidden.*'proj'"):
    jaxrank.save_peft_adapter(tmp_path / "b", model, variables, module_name=lambda p: "proj")


def test_load_peft_without_lora_alpha_names_the_key(tmp_path):
  _peft_dir(tmp_path)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  del config["lora_alpha"]
  config["alpha_pattern"] = {}
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="lora_alpha"):
    jaxrank.load_peft_adapter(tmp_path)


def test_load_peft_with_a_missing_lora_b_names_the_module(tmp_path):
  from safetensors.numpy import load_file, save_file
  _peft_dir(tmp_path)
  path = str(tmp_path / "adapter_model.safetensors")
  tensors = load_file(path)
  del tensors["base_model.model.hidden.lora_B.weight"]
  save_file(tensors, path)
  with pytest.raises(ValueError, match=r"hidden.*lora_B"):
    jaxrank.load_peft_adapter(tmp_path)


# --- 5. CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [(["--steps", "-5"], "--steps"),
                                          (["--batch-size", "0"], "--batch-size"),
                                          (["--eval-every", "-1"], "--eval-every"),
                                          (["--rank", "0"], "--rank"),
                                          (["--max-length", "0"], "--max-length"),
                                          (["--train-examples", "-1"], "--train-examples")])
def test_cli_rejects_bad_numbers_before_training(tmp_path, args, option):
  pytest.importorskip("typer")
  from typer.testing import CliRunner
  from jaxrank import cli
  result = CliRunner().invoke(cli.app, ["finetune", "--model", "tiny-bert", "--task",
                                        "synthetic", "--output-dir", str(tmp_path / "o"), *args])
  assert result.exit_code == 2, result.output
  assert option in result.output
  assert not (tmp_path / "o").exists()


def test_cli_rejects_an_output_dir_that_is_a_file_before_training(tmp_path):
  pytest.importorskip("typer")
  from typer.testing import CliRunner
  from jaxrank import cli
  target = tmp_path / "file"
  target.write_text("x")
  for command in ("finetune", "demo"):
    result = CliRunner().invoke(cli.app, [command, "--model", "tiny-bert", "--task", "synthetic",
                                          "--output-dir", str(target)])
    assert result.exit_code == 2, result.output
    assert "--output-dir" in result.output and "file" in result.output
