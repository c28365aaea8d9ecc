"""Checkpoint integrity: a checksum manifest written at save, verified at restore (issue 17)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrank
from jaxrank import checkpoint


def _state(value=0.0):
  return {"w": jnp.arange(100_000, dtype=jnp.float32) + value, "step": jnp.array(3),
          "rng": jax.random.key(0)}


def _biggest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  return max(files, key=os.path.getsize)


def test_save_writes_a_manifest_and_restore_verifies_it(tmp_path):
  checkpoint.save(tmp_path, 3, _state())
  manifest = json.loads((tmp_path / "3" / checkpoint.MANIFEST).read_text())
  assert manifest["step"] == 3 and manifest["files"]
  assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
  restored = checkpoint.restore(tmp_path, _state(1.0))
  np.testing.assert_array_equal(restored["w"], _state()["w"])


def test_overwritten_bytes_raise_naming_file_step_and_earlier_steps(tmp_path):
  checkpoint.save(tmp_path, 1, _state())
  checkpoint.save(tmp_path, 2, _state(2.0))
  data = _biggest_file(tmp_path / "2")
  with open(data, "r+b") as f:
    f.seek(os.path.getsize(data) // 2)
    f.write(b"\xff" * 64)
  with pytest.raises(checkpoint.CorruptCheckpointError) as info:
    checkpoint.restore(tmp_path, _state())
  message = str(info.value)
  assert os.path.relpath(data, tmp_path / "2") in message and "step 2" in message
  assert "[1, 2]" in message and "step=1" in message
  # the earlier step is intact and restores
  np.testing.assert_array_equal(checkpoint.restore(tmp_path, _state(), step=1)["w"], _state()["w"])


def test_truncated_file_raises_a_clear_error(tmp_path):
  checkpoint.save(tmp_path, 5, _state())
  data = _biggest_file(tmp_path / "5")
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 3)
  with pytest.raises(checkpoint.CorruptCheckpointError, match="truncated"):
    checkpoint.restore(tmp_path, _state())


def test_deleted_file_raises_a_clear_error(tmp_path):
  checkpoint.save(tmp_path, 5, _state())
  os.remove(_biggest_file(tmp_path / "5"))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="missing"):
    checkpoint.restore(tmp_path, _state())


def test_max_to_keep_removes_old_steps_with_their_manifests(tmp_path):
  for step in range(1, 5):
    checkpoint.save(tmp_path, step, _state(step), max_to_keep=2)
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [3, 4]
  assert (tmp_path / "4" / checkpoint.MANIFEST).exists()
  np.testing.assert_array_equal(checkpoint.restore(tmp_path, _state())["w"], _state(4)["w"])


def test_checkpoint_without_manifest_still_restores(tmp_path):
  """Checkpoints written before the manifest existed restore as before."""
  checkpoint.save(tmp_path, 3, _state())
  os.remove(tmp_path / "3" / checkpoint.MANIFEST)
  np.testing.assert_array_equal(checkpoint.restore(tmp_path, _state())["w"], _state()["w"])


def test_save_train_state_is_verified_too(tmp_path):
  from typing import NamedTuple

  class State(NamedTuple):
    step: jax.Array
    w: jax.Array

  jaxrank.checkpoint.save_train_state(tmp_path, State(jnp.array(7), jnp.ones(3)))
  assert (tmp_path / "7" / checkpoint.MANIFEST).exists()


# --- ten random corruptions, each detected; fallback restores the previous step exactly -------
def _data_files(step_dir):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
                if f != checkpoint.MANIFEST)


@pytest.mark.parametrize("case", range(10))
def test_random_corruptions_are_detected_and_fallback_restores_the_previous_step(tmp_path, case):
  rng = np.random.default_rng(case)
  checkpoint.save(tmp_path, 1, _state(1.0))
  checkpoint.save(tmp_path, 2, _state(2.0))
  files = _data_files(tmp_path / "2")
  victim = files[rng.integers(len(files))]
  size = os.path.getsize(victim)
  if case % 3 == 2 or size < 2:  # truncation
    with open(victim, "r+b") as f:
      f.truncate(int(rng.integers(size)))
  else:  # overwrite 1..64 bytes at a random offset with different bytes
    offset = int(rng.integers(size))
    with open(victim, "r+b") as f:
      f.seek(offset)
      old = f.read(int(rng.integers(1, 65)))
      f.seek(offset)
      f.write(bytes(b ^ 0xFF for b in old))
  with pytest.raises(checkpoint.CorruptCheckpointError, match="step 2"):
    checkpoint.restore(tmp_path, _state())
  with pytest.warns(checkpoint.CorruptCheckpointWarning, match="step 2"):
    restored = checkpoint.restore(tmp_path, _state(), fallback=True)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(1.0))):
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bit-identical


def test_fallback_without_an_intact_step_raises(tmp_path):
  checkpoint.save(tmp_path, 1, _state())
  data = _biggest_file(tmp_path / "1")
  with open(data, "r+b") as f:
    f.truncate(10)
  with pytest.raises(checkpoint.CorruptCheckpointError, match="No other step"):
    checkpoint.restore(tmp_path, _state(), fallback=True)


def test_restored_arrays_are_checked_against_their_own_checksums(tmp_path):
  """A per-array sha256 is written with the checkpoint and verified after the restore."""
  checkpoint.save(tmp_path, 3, _state())
  manifest_path = tmp_path / "3" / checkpoint.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  assert "['w']" in manifest["arrays"] and "['rng']" in manifest["arrays"]
  manifest["arrays"]["['w']"]["sha256"] = "0" * 64  # as if the data had changed since save
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"\['w'\].*array"):
    checkpoint.restore(tmp_path, _state())


# --- SIGKILL during a save never loses the previous step ------------------------------------
def _kill_during_second_save(directory, rng):
  import signal
  import subprocess
  import sys
  import time

  script = os.path.join(os.path.dirname(__file__), "kill_during_save_script.py")
  child = subprocess.Popen([sys.executable, script, str(directory)], stdout=subprocess.PIPE,
                           text=True)
  try:
    saved_1 = child.stdout.readline().split()
    assert saved_1[:2] == ["SAVED", "1"], saved_1
    assert child.stdout.readline().strip() == "SAVING 2"
    time.sleep(rng.uniform(0.0, 1.2 * float(saved_1[2])))  # a random moment of the save
    child.send_signal(signal.SIGKILL)
  finally:
    child.wait(timeout=120)
    child.stdout.close()
  import kill_during_save_script as script_module
  step_1 = checkpoint.restore(directory, script_module.state(0.0), step=1)
  np.testing.assert_array_equal(step_1["w"], script_module.state(1.0)["w"])  # bit-identical
  latest = checkpoint.restore(directory, script_module.state(0.0), fallback=True)
  assert int(latest["step"]) in (1, 2)
  np.testing.assert_array_equal(latest["w"], script_module.state(float(latest["step"]))["w"])
  return int(latest["step"])


def test_sigkill_during_a_save_keeps_the_previous_step(tmp_path):
  _kill_during_second_save(tmp_path, np.random.default_rng(0))


@pytest.mark.slow
def test_sigkill_at_ten_random_moments_of_a_save_keeps_the_previous_step(tmp_path):
  rng = np.random.default_rng(1)
  latest = [_kill_during_second_save(tmp_path / str(i), rng) for i in range(10)]
  print("latest step restored after each kill:", latest)
