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
