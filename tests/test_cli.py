"""The ``jaxrank`` command on a tiny random BERT and a synthetic task (seconds, no downloads)."""

import json

import numpy as np
import pytest

pytest.importorskip("typer", reason="the jaxrank command needs typer (`pip install typer`)")
transformers = pytest.importorskip(
    "transformers", reason="install the 'hf' extra (transformers>=4.57,<5)")
if not hasattr(transformers, "FlaxBertForSequenceClassification"):
  pytest.skip("this transformers release has no Flax classes (need <5)", allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from jaxrank import cli  # noqa: E402

TINY = ["--model", "tiny-bert", "--task", "synthetic", "--max-length", "16",
        "--batch-size", "16", "--train-examples", "64", "--lr", "1e-2", "--no-progress"]


def _run(args):
  result = CliRunner().invoke(cli.app, args)
  assert result.exit_code == 0, result.output + repr(result.exception)
  return result.output


def test_finetune_lora_writes_metrics_heatmap_checkpoint_and_adapter(tmp_path):
  out = tmp_path / "run"
  text = _run(["finetune", *TINY, "--method", "lora", "--budget-rank", "3", "--steps", "12",
               "--eval-every", "4", "--output-dir", str(out)])
  assert "eval_accuracy" in text and "total rank 36 over 12 matrices" in text
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["method"] == "lora"
  assert len(summary["rank_pattern"]) == 12 and set(summary["rank_pattern"].values()) == {3}
  assert [h["step"] for h in summary["history"]] == [4, 8, 12]
  assert 0.0 <= summary["final_metrics"]["test_accuracy"] <= 1.0
  # rank 3 on 12 matrices of the 16-wide model: 2 x (16+16) x 3 x 8 + (16+32) x 3 x 4 ... exactly:
  fans = {"query": 32, "key": 32, "value": 32, "attention/output/dense": 32,
          "intermediate/dense": 48, "output/dense": 48}
  assert summary["trainable_parameters"] == 2 * 3 * sum(fans.values())
  png = (out / "rank_heatmap.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"

  from safetensors.numpy import load_file
  tensors = load_file(str(out / "adapter" / "adapter.safetensors"))
  config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  a = tensors["lora/bert/encoder/layer/0/attention/self/query/A"]
  b = tensors["lora/bert/encoder/layer/0/attention/self/query/B"]
  assert a.shape == (16, 3) and b.shape == (3, 16) and np.abs(b).sum() > 0
  assert "head/classifier/kernel" in tensors and config["rank_pattern"] == summary["rank_pattern"]

  from jaxrank import checkpoint
  assert checkpoint.latest_step(out / "checkpoint") == 12
  assert sorted(int(p.name) for p in (out / "checkpoint").iterdir() if p.name.isdigit()) == [4, 8, 12]
  peft_config = json.loads((out / "adapter" / "peft" / "adapter_config.json").read_text())
  assert peft_config["rank_pattern"]["bert.encoder.layer.0.attention.self.query"] == 3


def test_finetune_frozen_baseline_trains_only_the_head(tmp_path):
  out = tmp_path / "frozen"
  text = _run(["finetune", *TINY, "--method", "frozen", "--steps", "6", "--eval-every", "0",
               "--output-dir", str(out)])
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["rank_pattern"] == {} and summary["trainable_parameters"] == 0
  assert summary["head_parameters"] == 16 * 16 + 16 + 16 * 3 + 3  # pooler + classifier
  assert "adapter parameters (live ranks): 0" in text


def test_demo_prints_one_table_row_per_method(tmp_path):
  text = _run(["demo", "--methods", "frozen,lora", *TINY, "--steps", "4",
               "--output-dir", str(tmp_path / "demo")])
  table = (tmp_path / "demo" / "table.md").read_text().splitlines()
  assert table[0].startswith("| method") and "test accuracy" in table[0]
  assert [line.split("|")[1].strip() for line in table[2:]] == ["frozen", "lora"]
  assert (tmp_path / "demo" / "lora" / "rank_heatmap.png").exists()
  assert "total wall time" in text


def test_bad_model_task_pair_is_a_clear_error():
  result = CliRunner().invoke(cli.app, ["finetune", "--model", "minilm", "--task", "austen"])
  assert result.exit_code != 0
  assert "--model minilm --task bbc-news" in result.output


def test_unknown_method_is_a_clear_error():
  result = CliRunner().invoke(cli.app, ["finetune", *TINY, "--method", "dora"])
  assert result.exit_code != 0 and "--method must be one of" in result.output


@pytest.mark.parametrize("method", ["sora", "adalora", "salora", "alora"])
def test_every_method_ends_within_the_rank_budget(tmp_path, method):
  out = tmp_path / method
  _run(["finetune", *TINY, "--method", method, "--rank", "4", "--budget-rank", "2",
        "--steps", "10", "--eval-every", "0", "--output-dir", str(out)])
  summary = json.loads((out / "metrics.json").read_text())
  ranks = list(summary["rank_pattern"].values())
  assert len(ranks) == 12 and all(0 <= r <= 4 for r in ranks)
  assert 0 < sum(ranks) <= 2 * 12  # the budget: average rank 2 over 12 matrices
  config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert config["rank_pattern"] == summary["rank_pattern"]  # compacted to the live ranks


# (the ALoRA scoring-chunk default moved with the recipes: tests/test_recipes.py)


@pytest.mark.parametrize("command", ["demo", "finetune"])
def test_help_names_the_models_tasks_and_methods(command):
  import os
  import subprocess
  import sys
  run = subprocess.run([sys.executable, "-m", "jaxrank.cli", command, "--help"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
  assert run.returncode == 0, run.stderr
  for name in ("minilm", "smollm2", "tiny-bert", "bbc-news", "austen", "synthetic",
               "frozen", "lora", "sora", "adalora", "salora", "alora"):
    assert name in run.stdout, name
  # typer lists each option with its help line
  assert "--budget-rank" in run.stdout and "final average rank" in run.stdout
  # nothing on the way to --help imports the heavy optional libraries
  probe = ("import sys; sys.argv = ['jaxrank', '--help']\n"
           "from jaxrank import cli\ntry:\n  cli.main()\nexcept SystemExit:\n  pass\n"
           "print(sorted(m for m in ('transformers', 'matplotlib') if m in sys.modules))")
  run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=300)
  assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout + run.stderr


def test_cpu_devices_trains_every_method_data_parallel_in_a_fresh_process(tmp_path):
  import os
  import subprocess
  import sys
  tables = {}
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import sys, jax; from jaxrank import cli; sys.argv = ['jaxrank'] + sys.argv[1:]\n"
          "try:\n  cli.main()\nexcept SystemExit as e:\n  assert not e.code, e.code\n"
          "print('devices', jax.device_count())")
  for devices in ("1", "2"):
    out = tmp_path / f"devices{devices}"
    run = subprocess.run(
        [sys.executable, "-c", code, "demo", "--methods", "lora,sora,adalora,salora,alora",
         *TINY, "--rank", "4", "--budget-rank", "2", "--steps", "8", "--cpu-devices", devices,
         "--output-dir", str(out)],
        env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"devices {devices}" in run.stdout
    # every column but the wall time
    tables[devices] = [line.split("|")[1:-2]
                       for line in (out / "table.md").read_text().splitlines()]
  # splitting each batch over two devices trains the same models to the same ranks
  assert len(tables["1"]) == 2 + 5 and tables["2"] == tables["1"]


def test_cpu_devices_errors_name_the_fix():
  import jax
  result = CliRunner().invoke(cli.app, ["finetune", *TINY, "--cpu-devices", "-1"])
  assert result.exit_code != 0 and "--cpu-devices must be >= 0" in result.output
  result = CliRunner().invoke(cli.app, ["finetune", *TINY, "--cpu-devices", "3"])
  assert result.exit_code != 0 and "--batch-size 16 does not split" in result.output
  # once this process runs JAX on one device, it is too late to split the CPU
  assert jax.device_count() < 16
  result = CliRunner().invoke(cli.app, ["finetune", *TINY, "--cpu-devices", "16"])
  assert result.exit_code != 0 and "run jaxrank in a fresh process" in result.output
