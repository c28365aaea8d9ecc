"""Fine-tune on your own texts from Python: the path of ``jaxrank finetune --train FILE``.

:func:`finetune_texts` takes texts and labels (a ``(texts, labels)`` pair, a dict of columns,
a ``datasets.Dataset`` or a CSV/JSON Lines/Parquet path), a base model (``minilm``,
``smollm2`` or a local Hugging Face model folder) and a method (a :class:`jaxrank.Recipe` or
its name), tokenises with the model's tokenizer, holds out a stratified validation fraction
when no validation split is given, trains with length bucketing and returns the trained
result with its metrics (accuracy and macro-F1, or perplexity), rank pattern and label names.

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
      classification; LLaMA family: causal LM, with ``label_field=None``).
    method: a :class:`jaxrank.Recipe` (``jaxrank.recipe("sora", budget_rank=4, dropout=0.1)``)
      or a recipe name (its defaults at ``total_steps=steps``).
    train, validation, test: ``(texts, labels)`` pairs (a list of texts for causal LM), dicts
      of columns, ``datasets.Dataset``\\ s or file paths. Without ``validation``, a seeded,
      stratified ``validation_fraction`` of ``train`` is held out.
    text_field, label_field: the column names of dicts, Datasets and files.
    steps, batch_size, max_length, learning_rate, head_learning_rate, head_weight_decay,
      eval_every, seed: as in :func:`jaxrank.train.fit` (``max_length``: tokens per text).
    bucketing: pad each batch to the smallest of a few lengths (default) or to
      ``max_length``. No training row is dropped: the last partial batch of an epoch is
      filled with rows of weight 0.
    output_dir: also write ``metrics.json``, ``metrics.jsonl``, the heatmap, the checkpoint
      and the adapter (with the label names) there, as the CLI does.

  Raises:
    ValueError: for bad input (an unsupported model, a missing field, one class, no texts).
  """
  from jaxrank import _report
  from jaxrank import recipes
  from jaxrank import setups
  if isinstance(train, list):
    train = (train,)
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
