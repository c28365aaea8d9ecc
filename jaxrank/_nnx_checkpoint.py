"""Orbax checkpoints of an NNX run: the adapter, the optimizer state and the step rng key.

:func:`save_checkpoint` writes, through :func:`jaxrank.checkpoint.save` (atomic, with a
sha256 manifest), the model's trainable state (``jaxrank.nnx.TRAINABLE``: factors and gates),
the whole ``nnx.Optimizer`` state (its ``step`` and the method's optax state: EMAs, budget
step, SaLoRA's λ, ALoRA's schedule) and, if given, the rng key of the step chain. The frozen
base is not written: it is the pretrained weights, loaded again on resume.

:func:`restore_checkpoint` reads them into a freshly set-up model and optimizer of the same
structure (e.g. from :func:`jaxrank.nnx.setup` in a new process). Resuming then continues
bit-for-bit as if training had never stopped (``tests/test_nnx_resume.py``).

Example:
  >>> import tempfile, jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import jaxrank
  >>> def build():
  ...   model = jaxrank.nnx.wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), adapter=jaxrank.LoRA(rank=2),
  ...                            rngs=nnx.Rngs(1))
  ...   return model, nnx.Optimizer(model, jaxrank.nnx.transform(optax.adam(0.1)),
  ...                               wrt=jaxrank.nnx.TRAINABLE)
  >>> model, optimizer = build()
  >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3)))),
  ...                  argnums=nnx.DiffState(0, jaxrank.nnx.TRAINABLE))(model)
  >>> _ = optimizer.update(model, grads)  # returns the applied updates when not jitted
  >>> directory = tempfile.mkdtemp()
  >>> jaxrank.nnx.save_checkpoint(directory, 1, model, optimizer, key=jax.random.key(7))
  >>> fresh, fresh_optimizer = build()
  >>> key = jaxrank.nnx.restore_checkpoint(directory, fresh, fresh_optimizer,
  ...                                      key=jax.random.key(0))
  >>> int(fresh_optimizer.step[...]), bool(jnp.all(fresh.lora.B[...] == model.lora.B[...]))
  (1, True)
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from jaxrank import checkpoint as _checkpoint
from jaxrank import _nnx_layers

_TRAINABLE = (nnx.LoRAParam, _nnx_layers.Gate)


def _state(model: nnx.Module, optimizer: nnx.Optimizer, key: Optional[jax.Array]) -> dict:
  state = {"trainable": nnx.to_pure_dict(nnx.state(model, _TRAINABLE)),
           "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}
  if key is not None:
    state["key"] = key
  return state


def save_checkpoint(directory, step: int, model: nnx.Module, optimizer: nnx.Optimizer, *,
                    key: Optional[jax.Array] = None, max_to_keep: Optional[int] = 3) -> None:
  """Writes checkpoint ``step`` of an adapted NNX ``model`` and its ``optimizer`` (and ``key``).

  Args:
    directory: the checkpoint folder (one sub-folder per step, the newest ``max_to_keep`` kept).
    step: the step number to file it under (normally ``int(optimizer.step[...])``).
    model: the model :func:`jaxrank.nnx.wrap` adapted (only its trainable state is written).
    optimizer: its ``nnx.Optimizer``.
    key: the rng key the loop splits its step keys from, to resume the same noise.
  """
  _checkpoint.save(directory, step, _state(model, optimizer, key), max_to_keep=max_to_keep)


def restore_checkpoint(directory, model: nnx.Module, optimizer: nnx.Optimizer, *,
                       key: Optional[jax.Array] = None, step: Optional[int] = None):
  """Loads checkpoint ``step`` (default: the latest) into ``model`` and ``optimizer`` in place.

  ``model`` and ``optimizer`` must have the saved structure (same targets, adapter spec and
  recipe). Pass ``key`` (any key: it gives the type) iff one was saved; the saved key is
  returned (None without ``key``).

  Raises:
    FileNotFoundError: no complete checkpoint (or not ``step``) in ``directory``.
    jaxrank.checkpoint.CorruptCheckpointError: a file differs from its checksum at save.
    ValueError: the checkpoint's tree does not match this model/optimizer (orbax's message).
  """
  target = _state(model, optimizer, key)
  restored = _checkpoint.restore(directory, target, step=step)
  trainable = nnx.state(model, _TRAINABLE)
  nnx.replace_by_pure_dict(trainable, restored["trainable"])
  nnx.update(model, trainable)
  optimizer_state = nnx.state(optimizer)
  nnx.replace_by_pure_dict(optimizer_state, restored["optimizer"])
  nnx.update(optimizer, optimizer_state)
  return restored.get("key")
