"""The catalogue of bad inputs (issue 17): each case must raise a clear error of the stated type
whose message names the offending argument, before any work is done.

Each row: (case id, a callable that makes the mistake, the error type, a regex the message must
match: it names the argument or the fix). Cheap by design: no training runs here.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrank
from jaxrank import checkpoint
from jaxrank import recipes
from jaxrank import train


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="out")(nn.tanh(nn.Dense(16, name="hidden")(x)))


X = jnp.ones((2, 8))


def _init(adapter, targets="all-linear"):
  model = jaxrank.wrap(MLP(), targets, adapter=adapter)
  return model, model.init(jax.random.key(0), X)


def _gates_params():
  return {"gates": {"g": jnp.array([1.0, 0.02, -2.0])}, "lora": {"A": jnp.ones(3)}}


def _run_tx(tx, params, steps=5, **extra):
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params), state,
                            params, **extra)
    params = optax.apply_updates(params, updates)
    jax.block_until_ready(params)
  return params


# --- wrap and adapters -------------------------------------------------------------------------
def _rank_mismatch():
  _, small = _init(jaxrank.LoRA(rank=2))
  jaxrank.wrap(MLP(), adapter=jaxrank.LoRA(rank=4)).apply(small, X)


def _missing_lora_collection():
  model, variables = _init(jaxrank.LoRA(rank=2))
  model.apply({"params": variables["params"]}, X)


def _no_target_matches():
  _init(jaxrank.LoRA(rank=2), targets=["no_such_layer"])


WRAP = [
    ("lora-rank-0", lambda: jaxrank.LoRA(rank=0), ValueError, "rank"),
    ("lora-rank-float", lambda: jaxrank.LoRA(rank=2.5), ValueError, "rank"),
    ("lora-alpha-0", lambda: jaxrank.LoRA(rank=2, alpha=0.0), ValueError, "alpha"),
    ("lora-alpha-nan", lambda: jaxrank.LoRA(rank=2, alpha=float("nan")), ValueError, "alpha"),
    ("lora-dropout-1.5", lambda: jaxrank.LoRA(rank=2, dropout=1.5), ValueError, "dropout"),
    ("sora-rank-negative", lambda: jaxrank.SoRA(rank=-1), ValueError, "rank"),
    ("wrap-target-matches-nothing", _no_target_matches, ValueError, "no_such_layer"),
    ("apply-variables-of-another-rank", _rank_mismatch, ValueError, "rank"),
    ("apply-without-the-lora-collection", _missing_lora_collection, ValueError, "lora"),
]


# --- the four methods ---------------------------------------------------------------------------
def _sora_before_the_optimizer():
  _run_tx(optax.chain(jaxrank.sora_prox(1.0, 0.1), optax.adam(0.1)), _gates_params())


def _sora_schedule_turns_negative():
  _run_tx(optax.chain(optax.adam(0.1), jaxrank.sora_prox(lambda t: 0.15 - 0.1 * t, 0.1)),
          _gates_params())


def _sora_without_gates():
  jaxrank.sora_prox(0.1, 0.1).init({"lora": {"A": jnp.ones(2)}})


def _sora_update_without_params():
  tx = jaxrank.sora_prox(0.1, 0.1)
  params = _gates_params()
  tx.update(params, tx.init(params))


def _alora_without_validation_batch():
  adapter = jaxrank.ALoRA(rank=4, initial_rank=2)
  model, variables = _init(adapter)
  _, trainable = jaxrank.split_variables(variables)
  tx = jaxrank.alora(optax.adam(1e-2), adapter, lambda p, b: 0.0, warmup_steps=1,
                     recovery_steps=1, num_rounds=1)
  tx.update(trainable, tx.init(trainable), trainable)


def _salora_dropout_rng_without_gate_rng():
  model, variables = _init(jaxrank.SaLoRA(rank=2))
  model.apply(variables, X, rngs={"dropout": jax.random.key(1)})


def _salora_penalty_without_multiplier():
  model, variables = _init(jaxrank.SaLoRA(rank=2))
  jaxrank.salora_penalty(model, variables, target_density=0.5)


def _salora_target_density_above_1():
  model, variables = _init(jaxrank.SaLoRA(rank=2))
  jaxrank.salora_penalty(model, jaxrank.add_lagrange_multiplier(variables), target_density=1.5)


def _adalora(**kwargs):
  return lambda: jaxrank.adalora(optax.adam(1e-2), **{"total_step": 10, **kwargs})


def _alora(**kwargs):
  adapter = jaxrank.ALoRA(rank=4, initial_rank=2)
  config = {"warmup_steps": 2, "recovery_steps": 2, "num_rounds": 2, **kwargs}
  return lambda: jaxrank.alora(optax.adam(1e-2), adapter, lambda p, b: 0.0, **config)


def _lagrangian(*args, **kwargs):
  config = {"t_start": 0, "t_end": 5, "total_steps": 10, **kwargs}
  return lambda: jaxrank.lagrangian_ascent(*(args or (0.1,)), optax.adam(1e-2), **config)


METHODS = [
    ("sora-lam-negative", lambda: jaxrank.sora_prox(-0.1, 0.1), ValueError, "lam"),
    ("sora-lam-negative-array", lambda: jaxrank.sora_prox(jnp.array([-0.1]), 0.1),
     ValueError, "lam"),
    ("sora-lr-negative", lambda: jaxrank.sora_prox(0.1, -1.0), ValueError, "learning_rate"),
    ("sora-no-learning-rate", lambda: jaxrank.sora_prox(0.1), ValueError, "learning_rate"),
    ("sora-bad-compat", lambda: jaxrank.sora_prox(0.1, 0.1, compat="x"), ValueError, "compat"),
    ("sora-no-gates", _sora_without_gates, ValueError, "gates"),
    ("sora-update-without-params", _sora_update_without_params, ValueError, "params"),
    ("sora-before-the-optimizer", _sora_before_the_optimizer, Exception, "last transform"),
    ("sora-schedule-turns-negative", _sora_schedule_turns_negative, Exception, "lam is"),
    ("adalora-target-above-init", _adalora(init_r=2, target_r=4), ValueError, "target_r"),
    ("adalora-no-total-step", _adalora(total_step=None), ValueError, "total_step"),
    ("adalora-deltaT-0", _adalora(deltaT=0), ValueError, "deltaT"),
    ("adalora-bad-compat", _adalora(compat="x"), ValueError, "compat"),
    ("alora-warmup-0", _alora(warmup_steps=0), ValueError, "warmup_steps"),
    ("alora-schedule-past-the-end", _alora(total_steps=4), ValueError, "total_steps"),
    ("alora-ranks-per-round-0", _alora(ranks_per_round=0), ValueError, "ranks_per_round"),
    ("alora-chunk-size-0", _alora(chunk_size=0), ValueError, "chunk_size"),
    ("alora-no-validation-batch", _alora_without_validation_batch, ValueError,
     "validation batch"),
    ("salora-gamma-positive", lambda: jaxrank.SaLoRA(gamma=0.1), ValueError, "gamma"),
    ("salora-no-gate-rng-while-training", _salora_dropout_rng_without_gate_rng, ValueError,
     "hard_concrete"),
    ("salora-penalty-without-multiplier", _salora_penalty_without_multiplier, ValueError,
     "add_lagrange_multiplier"),
    ("salora-target-density-1.5", _salora_target_density_above_1, ValueError,
     "target_density"),
    ("salora-empty-window", _lagrangian(t_start=5, t_end=5), ValueError, "t_start"),
    ("salora-window-past-the-end", _lagrangian(t_end=20), ValueError, "t_end"),
    ("salora-negative-ascent-rate", _lagrangian(-0.1), ValueError, "learning_rate"),
]


# --- train, recipes ------------------------------------------------------------------------------
def _fit(**kwargs):
  from test_train import Net, _data, _task, _variables
  config = {"steps": 4, "batch_size": 8, "progress": False, "head": ("classifier",), **kwargs}
  train.fit(Net(), _variables(), config.pop("method", recipes.lora_recipe(rank=2)), _task(),
            train_data=config.pop("train_data", _data()), **config)


TRAIN = [
    ("fit-steps-0", lambda: _fit(steps=0), ValueError, "steps"),
    ("fit-batch-size-0", lambda: _fit(batch_size=0), ValueError, "batch_size"),
    ("fit-eval-every-negative", lambda: _fit(eval_every=-1), ValueError, "eval_every"),
    ("fit-eval-data-other-keys", lambda: _fit(eval_data={"x": np.zeros((8, 5), np.float32)}),
     ValueError, "eval_data"),
    ("fit-unknown-recipe-name", lambda: _fit(method="no_such_method"), ValueError,
     "no_such_method"),
    ("recipe-unknown-name", lambda: recipes.recipe("no_such_method"), ValueError,
     "no_such_method"),
]


# --- checkpoints -----------------------------------------------------------------------------------
def _restore_empty(tmp_path):
  checkpoint.restore(tmp_path, {"w": jnp.zeros(2)})


def _restore_missing_step(tmp_path):
  checkpoint.save(tmp_path, 1, {"w": jnp.zeros(2)})
  checkpoint.restore(tmp_path, {"w": jnp.zeros(2)}, step=7)


def _restore_corrupt(tmp_path):
  import os
  checkpoint.save(tmp_path, 1, {"w": jnp.arange(1000.0)})
  files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "1") for f in fs
           if f != checkpoint.MANIFEST]
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(3)
  checkpoint.restore(tmp_path, {"w": jnp.zeros(1000)})


CHECKPOINT = [
    ("restore-empty-directory", _restore_empty, FileNotFoundError, "No complete checkpoint"),
    ("restore-missing-step", _restore_missing_step, FileNotFoundError, "step 7"),
    ("restore-truncated-file", _restore_corrupt, checkpoint.CorruptCheckpointError,
     "step 1.*truncated"),
]


# --- PEFT I/O --------------------------------------------------------------------------------------
def _peft_dir(tmp_path):
  model, variables = _init(jaxrank.LoRA(rank=2))
  jaxrank.save_peft_adapter(tmp_path, model, variables)
  return model, variables


def _peft_without_alpha(tmp_path):
  _peft_dir(tmp_path)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  config.pop("lora_alpha")
  config["alpha_pattern"] = {}
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  jaxrank.load_peft_adapter(tmp_path)


def _peft_without_lora_b(tmp_path):
  from safetensors.numpy import load_file, save_file
  _peft_dir(tmp_path)
  path = str(tmp_path / "adapter_model.safetensors")
  tensors = {k: v for k, v in load_file(path).items() if "hidden.lora_B" not in k}
  save_file(tensors, path)
  jaxrank.load_peft_adapter(tmp_path)


def _peft_two_layers_one_name(tmp_path):
  model, variables = _init(jaxrank.LoRA(rank=2))
  jaxrank.save_peft_adapter(tmp_path, model, variables, module_name=lambda path: "proj")


def _peft_missing_directory(tmp_path):
  jaxrank.load_peft_adapter(tmp_path / "nothing_here")


PEFT = [
    ("peft-config-without-lora-alpha", _peft_without_alpha, ValueError, "lora_alpha"),
    ("peft-missing-lora-b", _peft_without_lora_b, ValueError, "lora_B"),
    ("peft-two-layers-one-name", _peft_two_layers_one_name, ValueError, "proj"),
    ("peft-missing-directory", _peft_missing_directory, (FileNotFoundError, ValueError),
     "nothing_here"),
]


# --- the CLI ---------------------------------------------------------------------------------------
def _cli(*args):
  def run(tmp_path):
    from typer.testing import CliRunner
    from jaxrank import cli
    result = CliRunner().invoke(cli.app, ["finetune", "--model", "tiny-bert", "--task",
                                          "synthetic", "--output-dir", str(tmp_path / "o"),
                                          *args])
    if result.exit_code == 2:
      raise SystemExit(result.output)
    raise AssertionError(f"exit code {result.exit_code}: {result.output}")
  return run


CLI = [
    ("cli-steps-negative", _cli("--steps", "-5"), SystemExit, "--steps"),
    ("cli-batch-size-0", _cli("--batch-size", "0"), SystemExit, "--batch-size"),
    ("cli-rank-0", _cli("--rank", "0"), SystemExit, "--rank"),
    ("cli-unknown-method", _cli("--method", "no_such_method"), SystemExit, "--method"),
]


CATALOGUE = WRAP + METHODS + TRAIN + CHECKPOINT + PEFT + CLI


def test_the_catalogue_has_at_least_forty_cases():
  assert len(CATALOGUE) >= 40 and len({case[0] for case in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("make_mistake, error, names", [c[1:] for c in CATALOGUE],
                         ids=[c[0] for c in CATALOGUE])
def test_a_bad_input_raises_a_clear_error_naming_it(make_mistake, error, names, tmp_path):
  takes_path = make_mistake.__code__.co_argcount == 1
  with pytest.raises(error, match=names):
    make_mistake(tmp_path) if takes_path else make_mistake()


def test_a_window_without_total_steps_warns_naming_it():
  with pytest.warns(jaxrank.UncheckedWindowWarning, match="total_steps"):
    jaxrank.lagrangian_ascent(0.1, optax.adam(1e-2), t_start=0, t_end=5)
