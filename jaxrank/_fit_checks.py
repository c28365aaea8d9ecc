"""The checks of :func:`jaxrank.train.fit`: its arguments, its eval data and finite losses.

A non-finite training loss or evaluation metric stops ``fit`` with :class:`NonFiniteError`
(a ``FloatingPointError``) before any rank decision is taken from it; the error carries the
last state whose training loss was finite, so nothing learned is lost.

Example:
  >>> import numpy as np
  >>> from jaxrank import _fit_checks
  >>> _fit_checks.check_fit_arguments(steps=0, batch_size=8, eval_batch_size=8, eval_every=0)
  Traceback (most recent call last):
  ...
  ValueError: fit: steps must be a positive int (the number of optimizer steps), got 0.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

NAN_HINT = ("Lower the learning rate (or add warmup / gradient clipping) and check the data "
            "for NaN or inf values (inputs, labels, loss weights).")


class NonFiniteError(FloatingPointError):
  """``fit`` met a NaN or infinite training loss or evaluation metric.

  Attributes:
    step: the step (1-based) whose loss, or after which the evaluation, was not finite.
    state: the last :class:`jaxrank.train.TrainState` with finite values (the initial state
      when the first step failed): resume or inspect from it.
    history: the evaluations recorded before the failure.
  """

  def __init__(self, message: str, *, step: int, state: Any, history: Optional[list] = None):
    super().__init__(message)
    self.step = step
    self.state = state
    self.history = list(history or [])


def check_fit_arguments(*, steps, batch_size, eval_batch_size, eval_every) -> None:
  """ValueErrors naming the argument for non-positive step counts and batch sizes."""
  def positive(name, value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"fit: {name} must be a positive int ({what}), got {value!r}.")
  positive("steps", steps, "the number of optimizer steps")
  positive("batch_size", batch_size, "training examples per step")
  if eval_batch_size is not None:
    positive("eval_batch_size", eval_batch_size, "evaluation examples per batch")
  if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 0:
    raise ValueError(f"fit: eval_every must be an int >= 0 (0: evaluate only at the end), got "
                     f"{eval_every!r}.")


def check_eval_data(train_data: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray],
                    name: str = "eval_data") -> None:
  """``data`` must have the training data's keys and per-example (trailing) shapes.

  Its first batch is also the validation batch of methods that score on one (ALoRA), where a
  mismatch would otherwise surface as a Flax shape error deep inside the method.
  """
  train_keys, keys = set(train_data), set(data) - {"weight"}
  if train_keys != keys:
    raise ValueError(
        f"fit: {name} has keys {sorted(keys)} but train_data has {sorted(train_keys)}; "
        f"{name} (whose first batch is also the validation batch of methods such as ALoRA) "
        f"needs the same keys: missing {sorted(train_keys - keys)}, extra "
        f"{sorted(keys - train_keys)}.")
  for key in sorted(train_keys):
    expected, found = np.shape(train_data[key])[1:], np.shape(data[key])[1:]
    if expected != found:
      raise ValueError(
          f"fit: {name}[{key!r}] has per-example shape {found} but train_data[{key!r}] has "
          f"{expected}; prepare both splits the same way (e.g. the same max_length / "
          f"feature count). Its first batch is also the validation batch of methods such as "
          f"ALoRA.")


def non_finite_loss(step: int, loss: float, state, history) -> NonFiniteError:
  """The error for a non-finite training loss at ``step`` (``state``: the last finite one)."""
  return NonFiniteError(
      f"fit: step {step} is not finite (the training loss is {loss}, or a gradient or a "
      f"method's scores are NaN/inf); stopped before any rank decision is taken from it, the "
      f"step not applied. {NAN_HINT} The error's .state holds the last state with finite values "
      f"(after step {int(state.step)}).", step=step, state=state, history=history)


def check_metrics(step: int, metrics: Mapping[str, Any], state, history, split="eval") -> None:
  """Raises :class:`NonFiniteError` when a summarized metric is NaN or infinite."""
  bad = {k: v for k, v in metrics.items()
         if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number)
         and not math.isfinite(float(v))}
  if bad:
    names = ", ".join(f"{split}_{k} = {v}" for k, v in bad.items())
    raise NonFiniteError(
        f"fit: the evaluation after step {step} gave {names}. {NAN_HINT} Check the {split} "
        f"split too; the error's .state holds the state that was evaluated.",
        step=step, state=state, history=history)
