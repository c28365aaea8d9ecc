"""The reference loop's progress bar (tqdm) and its one-line evaluation records."""

from __future__ import annotations


def format_record(record: dict) -> str:
  """``step 10  train_loss 0.5000 ...``: one history record on one line.

  >>> format_record({"step": 10, "train_loss": 0.5, "eval_accuracy": 0.25})
  'step 10  train_loss 0.5000  eval_accuracy 0.2500'
  """
  parts = [f"step {record['step']}"]
  for k, v in record.items():
    if k != "step" and isinstance(v, float):
      parts.append(f"{k} {v:.4f}")
  return "  ".join(parts)


class Bar:
  """A tqdm bar over ``total`` steps that shows the running loss, or nothing when disabled."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

  def step(self, running_loss: float):
    if self._bar is not None:
      self._bar.update(1)
      self._bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)

  def record(self, record: dict):
    if self._bar is not None:
      self._bar.write(format_record(record))

  def close(self):
    if self._bar is not None:
      self._bar.close()
