"""The trainable tree of the reference loop: adapters next to a fully trained task head.

The loop trains ``trainable = {'lora': ..., 'gates': ..., 'head': ...}`` next to frozen base
weights. ``head`` holds the freshly initialised task head (``params`` leaves such as
``classifier``) under the same paths as in ``params``: :func:`split_head` takes it out of the
pretrained ``params``, :func:`join` overlays it again, and :func:`with_head` gives it its own
optimizer beside the method's transform. :func:`warmup_linear_schedule` is the loop's
learning-rate schedule.

Example:
  >>> import numpy as np
  >>> from jaxrank import _heads
  >>> params = {"body": {"kernel": np.ones(2)}, "classifier": {"kernel": np.zeros(2)}}
  >>> body, head = _heads.split_head(params, ("classifier",))
  >>> sorted(body), sorted(head)
  (['body'], ['classifier'])
  >>> sorted(_heads.join({"params": body}, {"head": head})["params"])
  ['body', 'classifier']
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import optax
from flax import traverse_util

from jaxrank import _tree

HEAD = "head"


def split_head(params, head: Sequence[str]) -> tuple[dict, dict]:
  """Splits ``params`` into ``(body, head)``: head leaves have a path element in ``head``."""
  flat = traverse_util.flatten_dict(_tree.plain(params))
  is_head = lambda path: any(name in head for name in path)
  body = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_head(k)})
  head_params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_head(k)})
  return body, head_params


def join(frozen, trainable) -> dict:
  """Full variables from ``frozen`` and ``trainable`` (the head overlaid on ``params``)."""
  variables = dict(_tree.plain(frozen))
  head = trainable.get(HEAD) if isinstance(trainable, Mapping) else None
  if isinstance(head, Mapping) and head:
    flat = traverse_util.flatten_dict(_tree.plain(variables["params"]))
    # inside optax.partition the head's leaves may be MaskedNodes: keep the frozen copy then
    flat.update({k: v for k, v in traverse_util.flatten_dict(_tree.plain(head)).items()
                 if not isinstance(v, optax.MaskedNode)})
    variables["params"] = traverse_util.unflatten_dict(flat)
  for collection, tree in trainable.items():
    if collection != HEAD:
      variables[collection] = tree
  return variables


def with_head(method_tx: optax.GradientTransformation,
              head_tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``method_tx`` on ``{'lora', 'gates'}`` and ``head_tx`` on ``trainable['head']``.

  Inside ``method_tx`` the head is an ``optax.MaskedNode`` (a pytree without leaves).
  """
  labels = lambda tree: {k: jax.tree.map(lambda _, k=k: HEAD if k == HEAD else "adapter", v)
                         for k, v in tree.items()}
  return optax.with_extra_args_support(
      optax.partition({HEAD: head_tx, "adapter": method_tx}, labels))


def warmup_linear_schedule(learning_rate: float, total_steps: int,
                           warmup_fraction: float = 0.06) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then linear decay to zero (the GLUE recipe).

  Example:
    >>> s = warmup_linear_schedule(1.0, 100)
    >>> float(s(0)), float(s(6)), float(s(100))
    (0.0, 1.0, 0.0)
  """
  warmup = max(1, int(total_steps * warmup_fraction))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup),
       optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))], [warmup])
