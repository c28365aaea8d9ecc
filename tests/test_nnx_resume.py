"""An orbax checkpoint of an NNX run resumes bit-exactly, in a fresh process, for every method.

N steps straight, against N/2 steps, jaxrank.nnx.save_checkpoint, then (in a new Python
process) a freshly built model and optimizer, jaxrank.nnx.restore_checkpoint and N/2 more:
the adapter, the whole optimizer state (the methods' EMAs, budgets, λ, ALoRA's schedule and
masks) and the step key must be identical, bit for bit.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxrank
import nnx_resume_script as script

STEPS = 12  # ALoRA's rounds (from step 2 on) and AdaLoRA's budget schedule straddle step 6
METHODS = ["sora", "adalora", "salora", "alora"]  # the methods with state of their own


def test_nnx_checkpoint_resumes_bit_exactly(tmp_path):
  straight = {}
  for method in METHODS:
    model, training = script.build(method, STEPS)
    key = script.train(model, training, training.key, 0, STEPS // 2)
    jaxrank.nnx.save_checkpoint(tmp_path / method, STEPS // 2, model, training.optimizer, key=key)
    key = script.train(model, training, key, STEPS // 2, STEPS)  # the straight run goes on
    straight[method] = script.snapshot(model, training.optimizer, key)

  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__)),
       os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run([sys.executable, script.__file__, str(tmp_path), str(STEPS), *METHODS],
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  for method in METHODS:
    resumed = dict(np.load(tmp_path / f"{method}.npz"))
    expected = straight[method]
    assert sorted(resumed) == sorted(expected), method
    assert len([k for k in expected if k.startswith("optimizer")]) > 1, method
    # bit for bit (ALoRA's last_scores are NaN at dead ranks: NaN at the same places)
    same = lambda a, b: a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    differing = [k for k in expected if not same(resumed[k], expected[k])]
    assert not differing, f"{method}: resumed run differs at {differing[:5]}"
    # the run did train: the factors moved away from their initialisation
    fresh_model, fresh_training = script.build(method, STEPS)
    fresh = script.snapshot(fresh_model, fresh_training.optimizer, fresh_training.key)
    moved = [k for k in expected if k.startswith("trainable")
             and not np.array_equal(fresh[k], expected[k])]
    assert moved, method


def test_restore_into_a_model_of_another_shape_fails(tmp_path):
  model, training = script.build("sora", STEPS)
  jaxrank.nnx.save_checkpoint(tmp_path, 0, model, training.optimizer, key=training.key)
  other, other_training = script.build("adalora", STEPS)  # other leaves (P/Q, EMAs)
  with pytest.raises(Exception):
    jaxrank.nnx.restore_checkpoint(tmp_path, other, other_training.optimizer,
                                   key=other_training.key)
  with pytest.raises(FileNotFoundError):
    jaxrank.nnx.restore_checkpoint(tmp_path / "empty", model, training.optimizer)
