"""Running one method for the ``jaxrank`` command and reporting it: files and tables.

:func:`run_one` trains a recipe on a :class:`jaxrank.setups.Setup` and writes its results;
:func:`table_row` and :func:`format_table` make the demo's comparison table.

Example:
  >>> print(format_table([{"method": "lora", "test accuracy": "97.00"}]))
  | method | test accuracy |
  |--------|---------------|
  | lora   | 97.00         |
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np


def run_one(setup, method, *, steps: int, batch_size: int, learning_rate: float,
            head_learning_rate: Optional[float], eval_every: int, seed: int,
            output_dir: Optional[Path], progress: bool = True, checkpoint: bool = True,
            eval_at_start: bool = False, mesh=None, fit_options: Optional[dict] = None,
            extra_config: Optional[dict] = None):
  """Trains ``method`` (a :class:`jaxrank.Recipe`) on ``setup``; writes ``metrics.json``, the
  rank heatmap, the checkpoint and the adapter under ``output_dir``, and every periodic
  evaluation (metrics, step time, rank pattern) as one line of ``metrics.jsonl`` beside the
  checkpoint. ``fit_options`` go to :func:`jaxrank.train.fit` (the set-up's bucket lengths
  are the default of ``bucket_lengths``); ``extra_config`` into the adapter's config.

  A non-finite loss (:class:`jaxrank.NonFiniteError`) is re-raised after the last finite
  state was saved as the checkpoint (with ``checkpoint`` on); no adapter is written then.
  """
  from jaxrank import train

  log = None
  if output_dir is not None:
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "metrics.jsonl"
    log.write_text("")

  def on_eval(step, record, state):
    if log is not None:
      with log.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if checkpoint and output_dir is not None:
      train.save_checkpoint(output_dir / "checkpoint", state)

  options = {"bucket_lengths": getattr(setup, "bucket_lengths", None), **(fit_options or {})}

  try:
    result = train.fit(
        setup.base, setup.variables, method, setup.task, train_data=setup.train_data,
        eval_data=setup.eval_data, test_data=setup.test_data, steps=steps,
        batch_size=batch_size, eval_every=eval_every, learning_rate=learning_rate,
        head_learning_rate=head_learning_rate, head=setup.head, targets=setup.targets,
        seed=seed, progress=progress, on_eval=on_eval, eval_at_start=eval_at_start, mesh=mesh,
        **options)
  except train.NonFiniteError as error:
    if checkpoint and output_dir is not None and int(error.state.step) > 0:
      path = train.save_checkpoint(output_dir / "checkpoint", error.state)
      error.args = (f"{error.args[0]} The last finite state (step {int(error.state.step)}) "
                    f"is saved in the checkpoint {path}.",)
    raise
  if output_dir is not None:
    if result.history:  # the final evaluation, as the last line
      with log.open("a") as f:
        f.write(json.dumps(result.history[-1]) + "\n")
    _write_results(result, output_dir, checkpoint, extra_config)
  return result


def _write_results(result, output_dir: Path, checkpoint: bool,
                   extra_config: Optional[dict] = None):
  from jaxrank import distributed, train
  if checkpoint:  # every process of a multi-process job: orbax writes each one's shards
    train.save_checkpoint(output_dir / "checkpoint", result.state)
  if result.state is not None and distributed.is_multi_process():
    result = dataclasses.replace(  # host copies for the files that process 0 alone writes
        result, variables=distributed.fetch(result.variables),
        state=result.state._replace(trainable=distributed.fetch(result.state.trainable)))
  distributed.write_once("jaxrank_results", lambda: _write_files(result, output_dir,
                                                                 extra_config))


def _write_files(result, output_dir: Path, extra_config: Optional[dict]):
  from jaxrank import plots, train  # plots needs matplotlib
  method = result.method
  output_dir.mkdir(parents=True, exist_ok=True)
  summary = {"method": method.name, "final_metrics": result.final_metrics,
             "rank_pattern": result.rank_pattern,
             "trainable_parameters": result.trainable_parameters,
             "head_parameters": result.head_parameters, "wall_time_s": result.wall_time,
             "live_ranks_before_finalize": result.live_ranks_before_finalize,
             "history": result.history, **(extra_config or {})}
  (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
  if result.rank_pattern:
    plots.rank_heatmap(result.rank_pattern, output_dir / "rank_heatmap.png",
                       title=f"{method.name}: learned rank per matrix",
                       max_rank=method.adapter.rank)
  train.export_adapter(result, output_dir / "adapter", extra_config=extra_config)


def total_rank(pattern) -> int:
  """The sum of a rank pattern's ranks."""
  return int(sum(np.sum(v) for v in pattern.values()))


def format_table(rows: list[dict]) -> str:
  """A Markdown table (what ``jaxrank demo`` prints and the README shows)."""
  headers = list(rows[0])
  widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
  line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(headers), sep] + [line([r[h] for h in headers]) for r in rows])


def table_row(result, metric: str) -> dict:
  """One row of the demo's table for a ``jaxrank.train.TrainResult``."""
  m = result.final_metrics
  pattern = result.rank_pattern
  ranks = sorted(int(v) for v in pattern.values()) if pattern else []
  rank_text = f"{total_rank(pattern)} (min {ranks[0]}, max {ranks[-1]})" if ranks else "-"
  before = result.live_ranks_before_finalize
  if before is not None and before != total_rank(pattern):
    rank_text += f", {before} before cut"
  value = lambda k: f"{100 * m[k]:.2f}" if metric == "accuracy" else f"{m[k]:.3f}"
  return {"method": result.method.name,
          f"val {metric}": value(f"eval_{metric}") if f"eval_{metric}" in m else "-",
          f"test {metric}": value(f"test_{metric}") if f"test_{metric}" in m else "-",
          "adapter params": f"{result.trainable_parameters:,}",
          "total rank": rank_text,
          "wall s": f"{result.wall_time:.0f}"}
