"""Fine-tune on your own texts from Python: the path of ``jaxrank finetune --train FILE``.

:func:`finetune_texts` takes texts and labels (a ``(texts, labels)`` pair, a dict of columns,
a ``datasets.Dataset`` or another table with column access, or a CSV/JSON Lines/Parquet
path), a base model (``minilm``, ``smollm2`` or a local Hugging Face model folder) and a method
(a :class:`jaxrank.Recipe` or its name), tokenises with the model's tokenizer, holds out a
stratified validation fraction when no validation split is given, trains and evaluates with
length bucketing and returns the trained result with its metrics (accuracy and macro-F1, or
perplexity), rank pattern and label names.

A local BERT folder loads as transformers loads it for a new task: the encoder and pooler from
the checkpoint, a fresh classifier of the data's class count (a saved classifier of another
size is replaced, with a warning naming both sizes, as ``ignore_mismatched_sizes=True``). A
local LLaMA folder runs RoPE at its config's ``rope_theta`` (its logits are PyTorch's).

Example (needs the MiniLM package; a minute on two cores):
  >>> import jaxrank
  >>> texts = ["a fine film", "an awful plot"] * 200
  >>> labels = ["pos", "neg"] * 200
  >>> run = jaxrank.finetune_texts("minilm", jaxrank.recipe("sora", budget_rank=2),
  ...                              (texts, labels), steps=60, max_length=32)  # doctest: +SKIP
  >>> run.result.final_metrics["eval_macro_f1"], run.label_names  # doctest: +SKIP
  (1.0, ('neg', 'pos'))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Union


class FineTuned(NamedTuple):
  """What :func:`finetune_texts` returns.

  Attributes:
    result: the :class:`jaxrank.train.TrainResult` (variables, history, final metrics, rank
      pattern, parameter counts).
    setup: the :class:`jaxrank.setups.Setup` trained on (model, task, token arrays).
    label_names: class ``i`` is ``label_names[i]`` (None for causal LM).
  """

  result: Any
  setup: Any
  label_names: Optional[tuple]


def finetune_texts(model: str, method, train, *, validation=None, test=None,
                   text_field: str = "text", label_field: Optional[str] = "label",
                   steps: int = 200, batch_size: int = 16, max_length: int = 128,
                   learning_rate: float = 1e-3, head_learning_rate: Optional[float] = None,
                   head_weight_decay: float = 0.0, eval_every: int = 0, seed: int = 0,
                   bucketing: bool = True, validation_fraction: float = 0.1,
                   output_dir: Optional[Union[str, Path]] = None,
                   progress: bool = True) -> FineTuned:
  """Fine-tunes ``model`` with ``method`` on the user's texts.

  Args:
    model: ``"minilm"``, ``"smollm2"`` or a Hugging Face model folder (BERT family:
      classification; LLaMA family: causal LM, with ``label_field=None``); see
      :func:`jaxrank._local_models.load_local_model`.
    method: a :class:`jaxrank.Recipe` (``jaxrank.recipe("sora", budget_rank=4, dropout=0.1)``)
      or a recipe name (its defaults at ``total_steps=steps``).
    train, validation, test: ``(texts, labels)`` pairs (a list of texts for causal LM), dicts
      of columns, tables with column access or file paths (CSV, JSON Lines, Parquet). A table
      is any object where ``data[name]`` is a column and ``column_names``, ``columns`` or
      ``keys()`` lists the names: a ``datasets.Dataset`` (one split, e.g.
      ``Dataset.from_dict(...)`` or ``load_dataset(...)["train"]``; jaxrank itself does not
      need the ``datasets`` package), a pandas or polars DataFrame, a pyarrow Table. Anything
      else, and a ``DatasetDict`` of several splits, raises a ValueError saying what to pass.
      Without ``validation``, a seeded, stratified ``validation_fraction`` of ``train`` is
      held out.
    text_field, label_field: the column names of dicts, Datasets and files.
    steps, batch_size, max_length, learning_rate, head_learning_rate, head_weight_decay,
      eval_every, seed: as in :func:`jaxrank.train.fit` (``max_length``: tokens per text).
    bucketing: pad each training, validation and test batch to the smallest of a few lengths
      that holds its longest text (default; the metrics equal fixed padding's up to float
      rounding) or to ``max_length``. No training row is dropped: the last partial batch of
      an epoch is filled with rows of weight 0.
    output_dir: also write ``metrics.json``, ``metrics.jsonl``, the heatmap, the checkpoint
      and the adapter (with the label names) there, as the CLI does.

  Raises:
    ValueError: for bad input (an unsupported model, a missing field, one class, no texts, a
      data object without column access).

  Warns:
    UserWarning: a BERT folder's saved classifier has another size than the data's classes
      (a fresh classifier is trained in its place).
  """
  from jaxrank import _report
  from jaxrank import recipes
  from jaxrank import setups
  as_columns = lambda split: (split,) if isinstance(split, list) else split  # causal-LM texts
  train, validation, test = as_columns(train), as_columns(validation), as_columns(test)
  if isinstance(method, str):
    method = recipes.recipe(method, total_steps=steps)
  setup = setups.own_data_setup(
      str(model), train, text_field=text_field, label_field=label_field,
      validation=validation, test=test, validation_fraction=validation_fraction,
      max_length=max_length, seed=seed, bucketing=bucketing)
  extra = {"label_names": list(setup.label_names)} if setup.label_names else None
  result = _report.run_one(
      setup, method, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
      head_learning_rate=head_learning_rate, eval_every=eval_every, seed=seed,
      output_dir=None if output_dir is None else Path(output_dir), progress=progress,
      checkpoint=output_dir is not None,
      fit_options={"head_weight_decay": head_weight_decay, "drop_remainder": False},
      extra_config=extra)
  return FineTuned(result, setup, setup.label_names)
