"""One process of a multi-process (or a single-process) jaxrank job on a tiny classifier.

python multiprocess_script.py MODE OUT --num-processes N --process-id I --port P [options]

Run with ``--xla_force_host_platform_device_count`` set to the devices per process. With
``--num-processes 1`` nothing is initialised: a plain single-process run, the reference.

Modes:
  fit   ``jaxrank.train.fit`` of every ``--methods`` recipe; process 0 writes
        ``OUT/<method>.npz`` (final lora/gates/head), every process writes
        ``OUT/<method>_pattern_p<I>.json`` (the rank pattern it holds); with ``--export``,
        the PEFT adapter and the merged kernels are written through ``write_once`` and every
        process logs the files it opened for writing there (Python ``open``/renames and
        safetensors' native writes), and their mtimes (``OUT/<method>_writes_p<I>.json``).
  loop  ``train.setup`` + ``jit_train_step`` for ``--steps`` steps of one method with a
        checkpoint every ``--save-every`` steps under ``OUT/ckpt``; ``--resume`` restores the
        latest checkpoint first (saved by a job of any process count; prints ``restored step
        N``), ``--die-at S`` makes process 1 exit abruptly before step S. Process 0 writes
        ``OUT/state.npz`` (every leaf of the final state).
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

ARGS = argparse.ArgumentParser()
ARGS.add_argument("mode", choices=("fit", "loop"))
ARGS.add_argument("out")
ARGS.add_argument("--num-processes", type=int, default=1)
ARGS.add_argument("--process-id", type=int, default=0)
ARGS.add_argument("--port", type=int, default=0)
ARGS.add_argument("--methods", default="lora")
ARGS.add_argument("--steps", type=int, default=24)
ARGS.add_argument("--batch-size", type=int, default=16)
ARGS.add_argument("--save-every", type=int, default=0)
ARGS.add_argument("--resume", action="store_true")
ARGS.add_argument("--die-at", type=int, default=0)
ARGS.add_argument("--export", action="store_true")
ARGS.add_argument("--heartbeat-timeout", type=int, default=10)
OPTIONS = ARGS.parse_args()

import jaxrank  # noqa: E402  (jax.distributed must start before any backend)

if OPTIONS.num_processes > 1:
  jaxrank.distributed.initialize(f"localhost:{OPTIONS.port}", OPTIONS.num_processes,
                                 OPTIONS.process_id,
                                 heartbeat_timeout_seconds=OPTIONS.heartbeat_timeout)

import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402

from jaxrank import recipes, tasks, train  # noqa: E402

WRITES = []  # paths this process opened for writing, renamed or created (sys.audit)


def _audit(event, args):
  if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and (
      any(c in str(args[1] or "") for c in "wax+")
      or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
    WRITES.append(os.fspath(args[0]))
  elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
    WRITES.append(os.fspath(args[-1] if event in ("os.rename", "os.replace") else args[0]))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(16, name="body0")(x))
    x = nn.tanh(nn.Dense(16, name="body1")(x))
    return nn.Dense(3, name="classifier")(x)


def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 8)).astype(np.float32)
  labels = (np.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1)).astype(np.int32)
  return {"x": x[:64], "labels": labels[:64]}, {"x": x[64:], "labels": labels[64:]}


TASK = tasks.classification_task(
    lambda m, v, b, rngs=None, deterministic=True: m.apply(
        v, b["x"], rngs=rngs or {}))
BASE = Net()
VARIABLES = BASE.init(jax.random.key(0), np.zeros((1, 8), np.float32))


def make_recipe(method, steps):
  return recipes.recipe(method, rank=4, budget_rank=2, total_steps=steps)


def host_leaves(tree) -> dict:
  """Every leaf of ``tree`` as numpy (keys: the tree paths), fetched on every process."""
  storable = jaxrank.checkpoint._to_storable(tree)
  leaves = jax.tree_util.tree_flatten_with_path(storable)[0]
  return {jax.tree_util.keystr(path): np.asarray(jaxrank.distributed.fetch(leaf))
          for path, leaf in leaves}


def _log_native_writes():
  """safetensors writes its files from Rust (no ``open`` audit event): log its calls too."""
  import safetensors.numpy
  save_file = safetensors.numpy.save_file

  def logged(tensors, filename, *args, **kwargs):
    WRITES.append(os.fspath(filename))
    return save_file(tensors, filename, *args, **kwargs)
  safetensors.numpy.save_file = logged  # jaxrank imports it at each call


def run_fit():
  if OPTIONS.export:
    sys.addaudithook(_audit)
    _log_native_writes()
  train_data, eval_data = data()
  for method in OPTIONS.methods.split(","):
    result = train.fit(BASE, VARIABLES, make_recipe(method, OPTIONS.steps), TASK,
                       train_data=train_data, eval_data=eval_data, steps=OPTIONS.steps,
                       batch_size=OPTIONS.batch_size, head=("classifier",),
                       learning_rate=2e-2, progress=False)
    trainable = {k: v for k, v in result.variables.items() if k != "params"}
    trainable["head"] = result.state.trainable["head"]
    leaves = host_leaves(trainable)
    pattern = {k: int(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
               for k, v in result.rank_pattern.items()}
    with open(os.path.join(OPTIONS.out, f"{method}_pattern_p{OPTIONS.process_id}.json"),
              "w") as f:
      json.dump({"pattern": pattern, "devices": jax.device_count(),
                 "processes": jax.process_count(), "metrics": result.final_metrics}, f)
    jaxrank.distributed.write_once(f"{method}_npz", lambda: np.savez(
        os.path.join(OPTIONS.out, f"{method}.npz"), **leaves))
    if OPTIONS.export:
      export(result, method)


def export(result, method):
  """The PEFT adapter and the merged kernels, written once (process 0, after a barrier)."""
  import safetensors.numpy
  host = jaxrank.distributed.fetch(result.variables)  # collective: every process
  merged = jaxrank.distributed.fetch(jaxrank.merge(result.model, result.variables))
  on_host = result.__class__(**{**result.__dict__, "variables": host,
                                "state": result.state._replace(
                                    trainable=jaxrank.distributed.fetch(result.state.trainable),
                                    opt_state=None, rng=None)})
  WRITES.clear()
  adapter_dir = os.path.join(OPTIONS.out, f"{method}_adapter")
  jaxrank.distributed.write_once(f"{method}_adapter",
                                 lambda: train.export_adapter(on_host, adapter_dir))
  merged_path = os.path.join(OPTIONS.out, f"{method}_merged.safetensors")
  jaxrank.distributed.write_once(f"{method}_merged", lambda: safetensors.numpy.save_file(
      {"/".join(k): np.ascontiguousarray(v)
       for k, v in traverse_util.flatten_dict(merged).items()}, merged_path))
  stamps = {p: os.stat(p).st_mtime_ns for p in _files(adapter_dir) + [merged_path]}
  jaxrank.distributed.barrier(f"{method}_exports_done")
  log = [p for p in WRITES if p.startswith((adapter_dir, merged_path))]
  with open(os.path.join(OPTIONS.out, f"{method}_writes_p{OPTIONS.process_id}.json"),
            "w") as f:
    json.dump({"writes": log, "mtimes": stamps}, f)


def _files(directory):
  return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                for name in names)


def run_loop():
  train_data, _ = data()
  method = make_recipe(OPTIONS.methods, OPTIONS.steps)
  multi = jax.process_count() > 1
  mesh = jaxrank.data_parallel_mesh() if multi else None
  prepared = train.setup(BASE, VARIABLES, method, TASK,
                         first_batch={k: v[:OPTIONS.batch_size] for k, v in train_data.items()},
                         steps=OPTIONS.steps, learning_rate=2e-2, head=("classifier",),
                         mesh=mesh)
  step_fn = train.jit_train_step(
      train.make_train_step(prepared.model, method, TASK, prepared.tx), mesh)
  state, ckpt = prepared.state, os.path.join(OPTIONS.out, "ckpt")
  if OPTIONS.resume and jaxrank.checkpoint.latest_step(ckpt) is not None:
    state = jaxrank.checkpoint.restore(ckpt, state)
    print(f"process {OPTIONS.process_id} restored step {int(state.step)}", flush=True)
  if multi:
    rows = jaxrank.distributed.process_rows(mesh, OPTIONS.batch_size)
    iterator = jaxrank.distributed.local_batches(train_data, OPTIONS.batch_size, rows)
    place = jaxrank.distributed.local_batch_placement(mesh, OPTIONS.batch_size)
  else:
    iterator, place = train.batches(train_data, OPTIONS.batch_size), lambda b: b
  for _ in range(int(state.step)):  # the batches the checkpoint has seen
    next(iterator)
  for step in range(int(state.step) + 1, OPTIONS.steps + 1):
    if step == OPTIONS.die_at and OPTIONS.process_id == 1:
      print(f"process 1 exits abruptly before step {step}", flush=True)
      os._exit(17)
    state, _ = step_fn(prepared.frozen, state, place(next(iterator)))
    if OPTIONS.save_every and step % OPTIONS.save_every == 0:
      train.save_checkpoint(ckpt, state)
    print(f"process {OPTIONS.process_id} step {step} at {time.time():.3f}", flush=True)
  leaves = host_leaves(state)
  jaxrank.distributed.write_once("state_npz", lambda: np.savez(
      os.path.join(OPTIONS.out, "state.npz"), **leaves))


if __name__ == "__main__":
  os.makedirs(OPTIONS.out, exist_ok=True)
  run_fit() if OPTIONS.mode == "fit" else run_loop()
  print(f"process {OPTIONS.process_id} of {jax.process_count()} done", flush=True)
