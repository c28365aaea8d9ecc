"""Real multi-process jobs: several local CPU processes joined by jax.distributed (gloo).

Each test launches ``tests/multiprocess_script.py`` as 1, 2 or 4 processes (2 CPU devices
each) and compares what they wrote: the rank pattern every process holds and the final
variables against a single-process run on the same global batches; checkpoints restored into
a job of another process count; a killed process; exports written once.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_script.py")
METHODS = ("frozen", "lora", "sora", "adalora", "salora", "alora", "svd")
TIMEOUT = 600  # generous: the 2-core CI machine runs every process of a job at once


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(mode, out, processes, *args, devices=2, timeout=TIMEOUT):
  """Runs a job of ``processes`` processes; returns ``[(returncode, output), ...]`` and the
  wall seconds until the last one ended (processes still alive at ``timeout`` are killed)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, SCRIPT, mode, str(out), "--num-processes", str(processes),
       "--process-id", str(i), "--port", str(port), *map(str, args)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(processes)]
  start, results = time.monotonic(), []
  for proc in procs:
    try:
      output, _ = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
      proc.kill()
      output, _ = proc.communicate()
      output += "\n[killed by the test: timeout]"
    results.append((proc.returncode, output))
  return results, time.monotonic() - start


def ok(results):
  for i, (code, output) in enumerate(results):
    assert code == 0, f"process {i} exited {code}:\n{output[-4000:]}"


def compare_fit(tmp_path, methods, processes, steps=20, export=False):
  ref, job = tmp_path / "single", tmp_path / f"job{processes}"
  flags = ("--methods", ",".join(methods), "--steps", steps) + (("--export",) if export else ())
  ok(launch("fit", ref, 1, *flags, devices=1)[0])
  ok(launch("fit", job, processes, *flags)[0])
  report = {}
  for method in methods:
    expected = json.loads((ref / f"{method}_pattern_p0.json").read_text())
    held = [json.loads((job / f"{method}_pattern_p{i}.json").read_text())
            for i in range(processes)]
    assert all(h["processes"] == processes and h["devices"] == 2 * processes for h in held)
    for i, h in enumerate(held):  # every process holds the single-process rank pattern
      assert h["pattern"] == expected["pattern"], (method, i, h["pattern"], expected)
    single, multi = np.load(ref / f"{method}.npz"), np.load(job / f"{method}.npz")
    assert sorted(single.files) == sorted(multi.files)
    diff = max(float(np.max(np.abs(single[k] - multi[k]))) for k in single.files)
    assert diff < 1e-5, (method, diff)
    report[method] = diff
  print("max |single - multi-process| per method:", report)
  return report


def test_two_processes_match_one_and_export_once(tmp_path):
  """2 processes x 2 devices: AdaLoRA's budget as in one process; its PEFT adapter and
  merged kernels written once, by process 0."""
  compare_fit(tmp_path, ("adalora",), 2, export=True)
  _assert_written_once(tmp_path / "job2", "adalora", 2)


def _every_method():
  from jaxrank import recipes
  assert sorted(METHODS) == sorted(recipes.RECIPES)  # a new method joins these tests
  return METHODS


@pytest.mark.slow
def test_two_processes_every_method(tmp_path):
  compare_fit(tmp_path, _every_method(), 2)


@pytest.mark.slow
def test_four_processes_every_method(tmp_path):
  compare_fit(tmp_path, _every_method(), 4)


def _state(directory):
  return dict(np.load(directory / "state.npz"))


def _assert_same_state(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoint_restores_into_another_process_count(tmp_path, first, second):
  """Saved by a job of ``first`` processes, restored by one of ``second``: the same
  variables and optimizer state, leaf by leaf (the checksum manifest checked on restore)."""
  saved, restored = tmp_path / "saved", tmp_path / "restored"
  steps = ("--steps", 12, "--save-every", 12, "--methods", "adalora")
  ok(launch("loop", saved, first, *steps)[0])
  os.makedirs(restored)
  os.symlink(saved / "ckpt", restored / "ckpt")
  results = launch("loop", restored, second, *steps, "--resume")[0]
  ok(results)
  for i, (_, output) in enumerate(results):  # restored, not retrained: no step ran
    assert f"process {i} restored step 12" in output, output[-3000:]
    assert " step 1 at" not in output and " step 12 at" not in output, output[-3000:]
  assert (saved / "ckpt" / "12" / "jaxrank_checksums.json").exists()
  _assert_same_state(_state(saved), _state(restored))


@pytest.mark.slow
def test_killed_process_stops_the_job_and_the_restart_resumes_exactly(tmp_path):
  """Process 1 dies at step 9 (checkpoints every 4 steps): process 0 exits with JAX's error
  naming process 1 within the heartbeat timeout; the restarted job resumes from step 8 and
  ends where an uninterrupted job ends."""
  flags = ("--steps", 12, "--save-every", 4, "--methods", "sora", "--heartbeat-timeout", 5)
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  ok(launch("loop", whole, 2, *flags)[0])
  results, seconds = launch("loop", broken, 2, *flags, "--die-at", 9, timeout=300)
  ended = time.time()  # process 0 ended last (process 1 was already gone)
  (code0, out0), (code1, out1) = results
  assert code1 == 17, out1[-2000:]
  last_step = float(out1.split("process 1 step 8 at ")[1].split()[0])  # then it died
  print(f"the job with a killed process ended after {seconds:.1f} s; process 0 exited "
        f"{code0}, {ended - last_step:.1f} s after process 1's last step")
  assert code0 != 0 and "[killed by the test" not in out0, out0[-3000:]
  assert seconds < 300 and ended - last_step < 60  # heartbeat timeout 5 s, not a hang
  # JAX's coordination service names the lost process (its id on the next line)
  assert ("The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
          in out0), out0[-3000:]
  assert sorted(d for d in os.listdir(broken / "ckpt") if d.isdigit()) == ["4", "8"]  # the job did not finish
  resumed = launch("loop", broken, 2, *flags, "--resume")[0]
  ok(resumed)
  for i, (_, output) in enumerate(resumed):  # from the step-8 checkpoint, steps 9..12 only
    assert f"process {i} restored step 8" in output, output[-3000:]
    ran = [int(line.split()[3]) for line in output.splitlines()
           if line.startswith(f"process {i} step ")]
    assert ran == [9, 10, 11, 12], (i, ran)
  _assert_same_state(_state(whole), _state(broken))


def _assert_written_once(job, method, processes):
  """Exactly one PEFT adapter and one merged export: process 0 wrote each of their files
  exactly once (Python opens and safetensors' native writes both logged); no other process
  wrote, created or renamed anything there; every process, after the exports, and the test,
  after the job ended, see the files unchanged since then (same mtimes)."""
  logs = [json.loads((job / f"{method}_writes_p{i}.json").read_text())
          for i in range(processes)]
  expected = [f"{method}_adapter/adapter.safetensors",
              f"{method}_adapter/adapter_config.json",
              f"{method}_adapter/peft/adapter_config.json",
              f"{method}_adapter/peft/adapter_model.safetensors",
              f"{method}_merged.safetensors"]
  for i in range(1, processes):
    assert logs[i]["writes"] == [], (i, logs[i])
    assert logs[i]["mtimes"] == logs[0]["mtimes"], i
  file_writes = sorted(os.path.relpath(p, job) for p in logs[0]["writes"]
                       if not os.path.isdir(p))
  assert file_writes == expected, logs[0]["writes"]  # each file once, nothing else
  names = sorted(os.path.relpath(p, job) for p in logs[0]["mtimes"])
  assert names == expected  # the files on disk: one adapter, one merged export
  final = {str(p): p.stat().st_mtime_ns for p in (job / f"{method}_adapter").rglob("*")
           if p.is_file()}
  final[str(job / f"{method}_merged.safetensors")] = (
      job / f"{method}_merged.safetensors").stat().st_mtime_ns
  assert final == logs[0]["mtimes"]


def _finetune(out, processes, port, i=0):
  args = [sys.executable, "-m", "jaxrank.cli", "finetune", "--model", "tiny-bert", "--task",
          "synthetic", "--max-length", "16", "--batch-size", "16", "--train-examples", "64",
          "--lr", "1e-2", "--no-progress", "--method", "sora", "--steps", "12",
          "--eval-every", "4", "--output-dir", str(out)]
  if processes > 1:
    args += ["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
             "--process-id", str(i), "--cpu-devices", "2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


@pytest.mark.slow
def test_cli_finetune_as_two_processes(tmp_path):
  """``jaxrank finetune --coordinator ... --num-processes 2 --process-id I`` in 2 processes:
  the single-process rank pattern, checkpoints by both, the results and adapter once."""
  single = _finetune(tmp_path / "single", 1, 0)
  assert single.wait(TIMEOUT) == 0, single.stdout.read()[-3000:]
  port = _free_port()
  procs = [_finetune(tmp_path / "job", 2, port, i) for i in range(2)]
  outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  for p, output in zip(procs, outputs):
    assert p.returncode == 0, output[-3000:]
  expected = json.loads((tmp_path / "single" / "metrics.json").read_text())
  summary = json.loads((tmp_path / "job" / "metrics.json").read_text())
  assert summary["rank_pattern"] == expected["rank_pattern"]
  for key, value in expected["final_metrics"].items():
    assert abs(summary["final_metrics"][key] - value) < 1e-4, (key, summary, expected)
  steps = sorted(int(p.name) for p in (tmp_path / "job" / "checkpoint").iterdir()
                 if p.name.isdigit())
  assert steps == [4, 8, 12]
  assert (tmp_path / "job" / "adapter" / "peft" / "adapter_model.safetensors").exists()
  assert "total rank" in outputs[0] and "total rank" in outputs[1]


@pytest.mark.parametrize("args,message", [
    (("localhost:1234", None, 0), "missing --num-processes"),
    (("localhost", 2, 0), "host:port"),
    (("localhost:1234", 2, 2), r"--process-id must be in \[0, 2\)"),
    (("localhost:1234", 0, 0), "--num-processes must be a positive integer"),
])
def test_initialize_rejects_bad_job_arguments(args, message):
  import jaxrank
  with pytest.raises(ValueError, match=message):
    jaxrank.distributed.initialize(*args)


def test_finetune_rejects_partial_job_options(tmp_path):
  from typer.testing import CliRunner
  from jaxrank import cli
  result = CliRunner().invoke(cli.app, ["finetune", "--model", "tiny-bert", "--task",
                                        "synthetic", "--coordinator", "localhost:1234",
                                        "--output-dir", str(tmp_path / "run")])
  assert result.exit_code != 0
  assert "missing --num-processes, --process-id" in result.output
