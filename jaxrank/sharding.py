"""Shardings for adapters, derived from the base kernels' shardings.

Rule (the qwix/MaxText precedent): the down factor ``A`` (``(*in_shape, r)``) follows the
kernel's input axes, the up factor ``B`` (``(r, *out_shape)``) follows its output axes, and the
rank axis and every gate are replicated. Layers stacked by ``nn.scan`` keep the kernel's
sharding of the stacked axes. So a tensor-parallel or FSDP layout of the base model gives the
adapters a matching layout with no extra collectives in the adapter branch beyond the base's.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> from jax.sharding import PartitionSpec as P
  >>> model = jaxrank.wrap(nn.Dense(8, name="proj"), adapter=jaxrank.LoRA(rank=2))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> specs = jaxrank.adapter_partition_specs(
  ...     model, variables, {"kernel": P(None, "model"), "bias": P("model")})
  >>> specs["lora"]
  {'A': P(None, None), 'B': P(None, 'model')}
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jaxrank import _tree


def _spec_of(x) -> PartitionSpec:
  if isinstance(x, NamedSharding):
    return x.spec
  if isinstance(x, PartitionSpec):
    return x
  if x is None:
    return PartitionSpec()
  raise TypeError(f"expected a PartitionSpec or NamedSharding, got {type(x).__name__}")


def _padded(spec: PartitionSpec, ndim: int) -> tuple:
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f"{spec} has more entries than the kernel's {ndim} axes")
  return entries + (None,) * (ndim - len(entries))


def adapter_partition_specs(model, variables, param_specs: Mapping[str, Any]) -> dict:
  """PartitionSpecs for the ``lora`` and ``gates`` collections.

  Args:
    model: the module returned by :func:`jaxrank.wrap`.
    variables: its variables (or ``jax.eval_shape`` of its ``init``).
    param_specs: a tree like ``variables['params']`` of PartitionSpec (or NamedSharding) for
      the base model.

  Returns:
    ``{'lora': specs, 'gates': specs}`` (``gates`` only when the adapter has gates).
  """
  flat_specs = traverse_util.flatten_dict(_tree.plain(param_specs))
  adapter = _tree.adapter_spec(model)
  lora, gates = {}, {}
  for path, layer in _tree.adapter_layers(adapter, variables).items():
    key = _tree.key_tuple(path)
    kernel_spec = flat_specs.get(key + ("kernel",))
    lead, n_in, n_out = layer.stacked_axes, len(layer.in_shape), len(layer.out_shape)
    entries = _padded(_spec_of(kernel_spec), lead + n_in + n_out)
    stacked, inputs, outputs = entries[:lead], entries[lead:lead + n_in], entries[lead + n_in:]
    lora[key + (adapter.down_name,)] = PartitionSpec(*stacked, *inputs, None)
    lora[key + (adapter.up_name,)] = PartitionSpec(*stacked, None, *outputs)
    for name, value in layer.gates.items():
      gates[key + (name,)] = PartitionSpec(*stacked, *([None] * (value.ndim - lead)))
  # Other leaves in ``gates`` (SaLoRA's Lagrange multiplier) are small: replicate them.
  for key, value in traverse_util.flatten_dict(_tree.plain(variables.get("gates", {}))).items():
    gates.setdefault(key, PartitionSpec(*([None] * len(value.shape))))
  specs = {"lora": traverse_util.unflatten_dict(lora)}
  if gates:
    specs["gates"] = traverse_util.unflatten_dict(gates)
  return specs


def variable_shardings(model, variables, mesh, param_specs) -> dict:
  """NamedShardings for all of a wrapped model's variables (base specs given, adapters derived)."""
  specs = {"params": param_specs, **adapter_partition_specs(model, variables, param_specs)}
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, _spec_of(spec)), specs,
      is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding)),
  )


def replicated(x: jax.Array) -> jax.Array:
  """Makes a small array (a score vector, an adapter factor) replicated on an Explicit mesh.

  Under an Explicit mesh a sort over a sharded axis, or a contraction over an axis sharded on
  both sides, is rejected; ranking and the r x r Gram matrices of the orthogonality penalty
  call this first. Under Auto axes and outside any mesh it is the identity.
  """
  aval = jax.typeof(x)
  sharding = getattr(aval, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not any(
      t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())
  ):
    return x
  return jax.sharding.reshard(x, PartitionSpec())


def data_parallel_mesh(devices: Optional[Sequence[jax.Device]] = None,
                       axis: str = "data") -> jax.sharding.Mesh:
  """A one-axis Auto mesh over ``devices`` (default: all) for ``jaxrank.train.fit(mesh=...)``.

  Auto, not Explicit: Hugging Face models index their embeddings with the (sharded) token ids,
  which Explicit sharding rejects.

  Example:
    >>> import jaxrank
    >>> jaxrank.data_parallel_mesh().axis_names
    ('data',)
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices), (axis,),
                           axis_types=(jax.sharding.AxisType.Auto,))
