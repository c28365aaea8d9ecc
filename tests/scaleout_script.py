"""Train one method config on 1 device and on 8 simulated devices; print the differences.

python scaleout_script.py METHOD STEPS   (run with --xla_force_host_platform_device_count=8)

Layouts: 1 device; data parallel on an Auto mesh; data parallel + tensor-parallel base kernels
(adapter shardings derived from the kernels) on an Auto mesh; data parallel on an Explicit
mesh; data parallel + a column-parallel base kernel on an Explicit mesh; pmap with grads
pmean-ed over an axis name. Prints one JSON line.
"""

import contextlib
import json
import os
import sys

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxrank

sys.path.insert(0, os.path.dirname(__file__))
import method_configs  # noqa: E402
import toy_training  # noqa: E402


def run(method, steps, layout):
  # Under pmap the ranking methods also average their scores over the mapped axis.
  axis_name = "batch" if layout == "pmap" else None
  config = method_configs.CONFIGS[method](steps, axis_name=axis_name)
  model, frozen, state, (x_all, y_all) = toy_training.setup(config, steps)
  devices = jax.devices()
  if layout == "pmap":
    n = len(devices)
    step = jax.pmap(toy_training.make_step(config, model, axis_name="batch"), axis_name="batch",
                    in_axes=(None, None, 0, 0))
    states = None
    for i in range(steps):
      x = x_all[i].reshape(n, -1, x_all.shape[-1])
      y = y_all[i].reshape(n, -1, y_all.shape[-1])
      states = step(state, frozen, x, y)
      state = jax.tree.map(lambda a: a[0], states)
    replicas_agree = all(
        bool(np.all(np.asarray(leaf) == np.asarray(leaf)[0:1]))
        for leaf in jax.tree.leaves(states["trainable"]))
    return state, frozen, model, replicas_agree
  step = jax.jit(toy_training.make_step(config, model))
  mesh = None
  if layout != "single":
    if layout == "data":
      mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,))
      param_specs = jax.tree.map(lambda _: P(), frozen["params"])
    elif layout == "explicit":
      mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Explicit,))
      param_specs = jax.tree.map(lambda _: P(), frozen["params"])
    elif layout == "tensor":  # data + tensor parallel base weights (column then row)
      mesh = jax.make_mesh((2, len(devices) // 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
      param_specs = {"hidden": {"kernel": P(None, "model"), "bias": P("model")},
                     "out": {"kernel": P("model", None), "bias": P()}}
    else:  # explicit_tensor: column-parallel hidden layer on an Explicit mesh
      mesh = jax.make_mesh((2, len(devices) // 2), ("data", "model"),
                           axis_types=(AxisType.Explicit,) * 2)
      param_specs = {"hidden": {"kernel": P(None, "model"), "bias": P("model")},
                     "out": {"kernel": P(), "bias": P()}}
    shardings = jaxrank.variable_shardings(model, {**frozen, **state["trainable"]}, mesh, param_specs)
    frozen = {"params": jax.device_put(frozen["params"], shardings["params"])}
    trainable_shardings = {k: shardings[k] for k in state["trainable"]}
    state = {**jax.device_put(state, NamedSharding(mesh, P())),
             "trainable": jax.device_put(state["trainable"], trainable_shardings)}
    # As a user would: the optimizer state is made from the placed parameters, so moments and
    # EMAs follow the parameters' shardings.
    with jax.set_mesh(mesh):
      state["opt_state"] = jax.jit(config.optimizer.init)(state["trainable"])
    x_all, y_all = jax.device_put((x_all, y_all), NamedSharding(mesh, P(None, "data")))
  with jax.set_mesh(mesh) if layout.startswith("explicit") else contextlib.nullcontext():
    for i in range(steps):
      state = step(state, frozen, x_all[i], y_all[i])
  return state, frozen, model, True


def main():
  method, steps = sys.argv[1], int(sys.argv[2])
  assert jax.device_count() == 8, jax.devices()
  reference, frozen, model, _ = run(method, steps, "single")
  ref_vars = jaxrank.join_variables(frozen, reference["trainable"])
  ref_pattern = jaxrank.rank_pattern(model, ref_vars)
  report = {"method": method, "reference_pattern": ref_pattern}
  for layout in ("data", "tensor", "explicit", "explicit_tensor", "pmap"):
    state, frozen_l, model_l, agree = run(method, steps, layout)
    variables = jaxrank.join_variables(frozen_l, state["trainable"])
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         variables["lora"], ref_vars["lora"])
    gate_diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                              variables.get("gates", {}), ref_vars.get("gates", {}))
    report[layout] = {
        "max_lora_diff": max(jax.tree.leaves(diffs)),
        "max_gate_diff": max(jax.tree.leaves(gate_diffs), default=0.0),
        "same_pattern": jaxrank.rank_pattern(model_l, variables) == ref_pattern,
        "replicas_agree": agree,
    }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
