"""The ``jaxrank`` command: fine-tune real models offline, compare the rank methods.

Commands (``jaxrank --help``, ``jaxrank COMMAND --help``):

* ``jaxrank finetune --model minilm --task bbc-news --method lora`` fine-tunes with one method
  and writes, under ``--output-dir``: ``metrics.json`` (final metrics, history, rank pattern),
  ``rank_heatmap.png``, ``checkpoint/`` (orbax) and ``adapter/`` (pruned plain-LoRA factors as
  safetensors + config).
* ``jaxrank finetune --model smollm2 --task austen`` causal-LM fine-tuning; reports perplexity.
* ``jaxrank demo`` runs the frozen-model baseline and every method at one equal final rank
  budget on BBC News, prints one comparison table and writes the heatmaps.
* ``jaxrank export RUN_DIR --model minilm --format hf`` merges a finetune run's adapter into
  its base model: a Hugging Face PyTorch checkpoint (``hf/``) and, for ``smollm2``, a GGUF.
* ``jaxrank setup-data`` extracts the Debian Jane Austen package into the data cache (once).

``--model tiny-bert --task synthetic`` is a seconds-long random model and task for smoke tests.
The methods are :data:`jaxrank.recipes.RECIPES`, the models and tasks
:data:`jaxrank.setups.SETUPS`; running, files and tables are ``jaxrank._report``'s. Only the
commands live here; nothing on the way to ``jaxrank --help`` imports transformers or matplotlib.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from jaxrank import _report
from jaxrank import recipes
from jaxrank import setups

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Dynamic-rank LoRA (SoRA, AdaLoRA, SaLoRA, ALoRA) for JAX/Flax.")

METHOD_NAMES = ", ".join(recipes.RECIPES)
MODEL_HELP = "the base model: " + ", ".join(
    f"{m} (task {t})" for m, t in setups.SETUPS) + (
    "; with --train FILE: minilm, smollm2 or PATH, a local Hugging Face model folder "
    "(BERT family: classification; LLaMA family: causal LM)")
TASK_HELP = "the task and its data: " + ", ".join(
    f"{t} (model {m})" for m, t in setups.SETUPS)


def _recipe(name: str, **options):
  if name not in recipes.RECIPES:
    raise typer.BadParameter(f"--method must be one of {METHOD_NAMES}; got {name!r}.")
  return recipes.recipe(name, **options)


def _setup(model: str, task: str, **kwargs):
  try:
    return setups.load_setup(model, task, **kwargs)
  except ValueError as error:
    raise typer.BadParameter(str(error)) from None


def _check_numbers(output_dir: Path, **values: int):
  """``typer.BadParameter`` for out-of-range numbers and an ``--output-dir`` that is a file,
  before anything is loaded or trained. Keys ending in ``_min0`` may be 0."""
  for key, value in values.items():
    name, low = (key[:-5], 0) if key.endswith("_min0") else (key, 1)
    option = "--" + name.replace("_", "-")
    if value < low:
      what = "a positive integer" if low else "an integer >= 0 (0: all / never)"
      raise typer.BadParameter(f"{option} must be {what}, got {value}.")
  if output_dir.exists() and not output_dir.is_dir():
    raise typer.BadParameter(f"--output-dir {output_dir} is an existing file, not a folder: "
                             "pass a folder (it is created if missing).")
  blocking = next((p for p in output_dir.parents if p.exists() and not p.is_dir()), None)
  if blocking is not None:
    raise typer.BadParameter(f"--output-dir {output_dir}: its parent {blocking} is a file, "
                             "not a folder.")


# --- commands -----------------------------------------------------------------------------
CPU_DEVICES_HELP = ("split the CPU into N XLA devices (0: one per core) and train data-parallel "
                    "over them: faster on multi-core CPUs (benchmarks/README.md); batch sizes "
                    "must be multiples of N")


def _join_job(coordinator: Optional[str], num_processes: Optional[int],
              process_id: Optional[int]) -> bool:
  """Joins a multi-process job (``--coordinator``/``--num-processes``/``--process-id``, or
  ``JAX_COORDINATOR_ADDRESS`` and JAX's cluster detection); False when there is none."""
  given = (coordinator, num_processes, process_id)
  if all(v is None for v in given) and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return False
  from jaxrank import distributed
  try:
    distributed.initialize(*given)
  except ValueError as error:
    raise typer.BadParameter(str(error)) from None
  return True


def _configure_jax(cpu_devices: int = 1, batch_size: int = 1):
  """Environment for offline runs; with ``cpu_devices`` != 1, splits the CPU into that many XLA
  devices (0: one per core) and returns a data-parallel mesh over them (else None)."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if cpu_devices == 1:
    return None
  if cpu_devices < 0:
    raise typer.BadParameter(f"--cpu-devices must be >= 0 (0: one per core), got {cpu_devices}.")
  import jax
  count = cpu_devices or os.cpu_count() or 1
  if batch_size % count:
    raise typer.BadParameter(f"--batch-size {batch_size} does not split over --cpu-devices "
                             f"{count}: use a multiple of {count}.")
  try:
    jax.config.update("jax_num_cpu_devices", count)
    too_late = None
  except RuntimeError as error:  # JAX already started (e.g. jaxrank called from Python)
    too_late = error
  if jax.default_backend() != "cpu":
    raise typer.BadParameter(
        f"--cpu-devices splits the CPU, but JAX runs on {jax.default_backend()} here; drop the "
        "option (or set JAX_PLATFORMS=cpu).")
  if too_late is not None and len(jax.devices()) < count:
    raise typer.BadParameter(
        f"--cpu-devices {count} must take effect before JAX starts, and this process already "
        f"runs JAX on {len(jax.devices())} cpu device(s): run jaxrank in a fresh process "
        f"({too_late})")
  from jaxrank import sharding
  return sharding.data_parallel_mesh(jax.devices()[:count])


@app.command()
def finetune(
    model: str = typer.Option("minilm", help=MODEL_HELP),
    task: str = typer.Option("bbc-news", help=TASK_HELP),
    method: str = typer.Option("lora", help=f"the rank method: {METHOD_NAMES}"),
    rank: int = typer.Option(8, help="per-matrix rank capacity r_max of the dynamic methods"),
    budget_rank: int = typer.Option(4, help="final average rank per adapted matrix (plain "
                                            "LoRA trains exactly this rank)"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)"),
    steps: int = typer.Option(200, help="optimizer steps"),
    batch_size: int = typer.Option(16, help="training examples per step"),
    max_length: int = typer.Option(128, help="tokens per example (longer texts truncated)"),
    learning_rate: float = typer.Option(1e-3, "--lr", help="peak learning rate of the adapters "
                                                            "(6 percent warmup, then linear decay)"),
    head_learning_rate: Optional[float] = typer.Option(
        None, "--head-lr", help="peak learning rate of the task head (default --lr)"),
    eval_every: int = typer.Option(50, help="evaluate on the validation split every N steps"),
    train_examples: int = typer.Option(0, help="use the first N training examples (0: all)"),
    eval_examples: int = typer.Option(0, help="use the first N validation/test examples (0: all)"),
    sora_lambda: float = typer.Option(0.1, help="SoRA sparsity strength (prox threshold)"),
    seed: int = typer.Option(0, help="seed of the head, the adapters and the data order"),
    output_dir: Path = typer.Option(Path("runs/finetune"), help="where results are written"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    eval_at_start: bool = typer.Option(False, help="also evaluate the model before training"),
    cpu_devices: int = typer.Option(1, help=CPU_DEVICES_HELP),
    coordinator: Optional[str] = typer.Option(
        None, help="host:port of process 0: run as one process of a multi-process job (with "
                   "--num-processes and --process-id; jaxrank.distributed). Without them, "
                   "JAX_COORDINATOR_ADDRESS in the environment starts JAX's own detection "
                   "(TPU pods, SLURM)"),
    num_processes: Optional[int] = typer.Option(None, help="processes of the job (with "
                                                           "--coordinator)"),
    process_id: Optional[int] = typer.Option(None, help="this process's index in the job, "
                                                        "0 .. --num-processes - 1"),
    flax: str = typer.Option("linen", help="linen (the Flax Linen model) or nnx (SmolLM2 as a "
                                           "Flax NNX model, jaxrank.models.llama_nnx)"),
    train: Optional[Path] = typer.Option(
        None, help="your own training data: a CSV, JSON Lines or Parquet file (replaces --task)"),
    validation: Optional[Path] = typer.Option(
        None, help="validation file (default: a seeded stratified --validation-fraction of "
                   "--train)"),
    test: Optional[Path] = typer.Option(None, help="test file (optional)"),
    text_field: str = typer.Option("text", help="the column of the texts"),
    label_field: Optional[str] = typer.Option(
        None, help="the column of the labels (strings or integers); omit for causal-LM text"),
    validation_fraction: float = typer.Option(0.1, help="held out of --train without "
                                                        "--validation"),
    bucketing: bool = typer.Option(True, help="pad each batch to the smallest of a few lengths "
                                              "(powers of two up to --max-length) instead of "
                                              "--max-length (with --train)"),
    dropout: float = typer.Option(0.0, help="dropout on the adapters' input"),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay of the adapters' factors "
                                                 "and of the head"),
):
  """Fine-tune one method and report metrics, the learned rank pattern and a heatmap."""
  own_data = train is not None
  if not own_data and (validation or test or label_field):
    raise typer.BadParameter("--validation, --test and --label-field need --train FILE.")
  if not own_data and model not in setups.MODELS:
    raise typer.BadParameter(f"--model {model}: a local model folder (or any model with your "
                             "own data) needs --train FILE.")
  if flax not in ("linen", "nnx"):
    raise typer.BadParameter(f"--flax must be linen or nnx, got {flax!r}.")
  if flax == "nnx" and (model != "smollm2" or own_data):
    raise typer.BadParameter("--flax nnx runs --model smollm2 --task austen only.")
  _check_numbers(output_dir, steps=steps, batch_size=batch_size, rank=rank,
                 budget_rank=budget_rank, max_length=max_length, eval_every_min0=eval_every,
                 train_examples_min0=train_examples, eval_examples_min0=eval_examples)
  multi_process = _join_job(coordinator, num_processes, process_id)
  if multi_process and flax == "nnx":
    raise typer.BadParameter("--coordinator runs the Linen models only; drop --flax nnx.")
  mesh = _configure_jax(cpu_devices, batch_size)
  if multi_process:  # train.fit's default: data parallel over every process's devices
    mesh = None
  knobs = {"lam": sora_lambda} if method == "sora" else {}
  if method != "frozen":
    knobs.update(dropout=dropout, weight_decay=weight_decay)
  built = _recipe(method, rank=rank, budget_rank=budget_rank, alpha=alpha, total_steps=steps,
                  **knobs)
  if own_data:
    try:
      setup = setups.own_data_setup(
          model, train, text_field=text_field, label_field=label_field, validation=validation,
          test=test, validation_fraction=validation_fraction, max_length=max_length, seed=seed,
          train_examples=train_examples, eval_examples=eval_examples, bucketing=bucketing)
    except ValueError as error:
      raise typer.BadParameter(str(error)) from None
    task = train.name
  else:
    setup = _setup(model, task, seed=seed, train_examples=train_examples,
                   max_length=max_length, eval_examples=eval_examples)
  extra = {"label_names": list(setup.label_names)} if setup.label_names else None
  if flax == "nnx":
    return _finetune_nnx(setup, built, steps=steps, batch_size=batch_size, seed=seed,
                         learning_rate=learning_rate, progress=progress)
  try:
    result = _report.run_one(setup, built, steps=steps, batch_size=batch_size,
                             learning_rate=learning_rate, head_learning_rate=head_learning_rate,
                             eval_every=eval_every, seed=seed, output_dir=output_dir,
                             progress=progress, eval_at_start=eval_at_start, mesh=mesh,
                             fit_options={"head_weight_decay": weight_decay,
                                          "drop_remainder": not own_data},
                             extra_config=extra)
  except FloatingPointError as error:  # jaxrank.NonFiniteError: a clear message, exit 1
    typer.echo(f"\nerror: {error}", err=True)
    raise typer.Exit(1) from None
  typer.echo(f"\nmethod {method} on {model}/{task}, {steps} steps, {result.wall_time:.1f} s")
  if eval_at_start:
    before = {k: v for k, v in result.history[0].items() if k.startswith("eval_")}
    typer.echo("  before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
  for k, v in result.final_metrics.items():
    typer.echo(f"  {k}: {v:.4f}")
  typer.echo(f"  adapter parameters (live ranks): {result.trainable_parameters:,}; "
             f"head parameters: {result.head_parameters:,}")
  if result.rank_pattern:
    typer.echo(f"  total rank {_report.total_rank(result.rank_pattern)} over "
               f"{len(result.rank_pattern)} matrices"
               + (f" ({result.live_ranks_before_finalize} live before the method's final step)"
                  if result.live_ranks_before_finalize is not None else ""))
    for path, r in result.rank_pattern.items():
      typer.echo(f"    {path}: {r}")
  typer.echo(f"  results in {output_dir}/ (metrics.json, metrics.jsonl, rank_heatmap.png, "
             "checkpoint/, adapter/)")


def _finetune_nnx(setup, recipe, *, steps, batch_size, seed, learning_rate, progress):
  """``finetune --flax nnx``: SmolLM2's weights in the NNX LLaMA, trained by jaxrank.nnx.fit."""
  from jaxrank import nnx as jaxrank_nnx
  from jaxrank.models import llama_nnx
  model = llama_nnx.from_flax_params(llama_nnx.LlamaConfig.from_dict(setup.base.config),
                                     setup.variables["params"])
  result = jaxrank_nnx.fit(model, recipe, llama_nnx.causal_lm_task(),
                           train_data=setup.train_data, eval_data=setup.eval_data, steps=steps,
                           batch_size=batch_size, learning_rate=learning_rate,
                           targets=setup.targets, seed=seed, progress=progress)
  typer.echo(f"\nmethod {recipe.name} on smollm2/austen (Flax NNX), {steps} steps, "
             f"{result.wall_time:.1f} s")
  for k, v in result.final_metrics.items():
    typer.echo(f"  {k}: {v:.4f}")
  typer.echo(f"  total rank {_report.total_rank(result.rank_pattern)} over "
             f"{len(result.rank_pattern)} matrices")


@app.command()
def demo(
    methods: str = typer.Option(",".join(recipes.RECIPES),
                                help=f"comma-separated methods to compare, of {METHOD_NAMES}"),
    model: str = typer.Option("minilm", help=MODEL_HELP),
    task: str = typer.Option("bbc-news", help=TASK_HELP),
    rank: int = typer.Option(8, help="rank capacity r_max of the dynamic methods"),
    budget_rank: int = typer.Option(4, help="the equal final average rank per matrix"),
    steps: int = typer.Option(60, help="optimizer steps of every method"),
    batch_size: int = typer.Option(16, help="training examples per step"),
    max_length: int = typer.Option(64, help="tokens per example (longer texts truncated)"),
    learning_rate: float = typer.Option(2e-3, "--lr", help="peak learning rate of the adapters"),
    head_learning_rate: Optional[float] = typer.Option(
        None, "--head-lr", help="peak learning rate of the task head (default --lr)"),
    train_examples: int = typer.Option(0, help="first N training examples (0: all)"),
    eval_examples: int = typer.Option(0, help="first N validation/test examples (0: all)"),
    seed: int = typer.Option(0, help="seed of the heads, the adapters and the data order"),
    output_dir: Path = typer.Option(Path("runs/demo"), help="where the table and heatmaps go"),
    progress: bool = typer.Option(True, help="show a progress bar per method"),
    cpu_devices: int = typer.Option(1, help=CPU_DEVICES_HELP),
):
  """All methods at one equal final rank budget on BBC News: one table, one heatmap each."""
  _check_numbers(output_dir, steps=steps, batch_size=batch_size, rank=rank,
                 budget_rank=budget_rank, max_length=max_length,
                 train_examples_min0=train_examples, eval_examples_min0=eval_examples)
  mesh = _configure_jax(cpu_devices, batch_size)
  start = time.perf_counter()
  names = [m.strip() for m in methods.split(",") if m.strip()]
  built = [_recipe(name, rank=rank, budget_rank=budget_rank, total_steps=steps)
           for name in names]
  setup = _setup(model, task, seed=seed, train_examples=train_examples,
                 max_length=max_length, eval_examples=eval_examples)
  rows = []
  for name, recipe in zip(names, built):
    result = _report.run_one(setup, recipe, steps=steps, batch_size=batch_size,
                             learning_rate=learning_rate, head_learning_rate=head_learning_rate,
                             eval_every=0, seed=seed, output_dir=output_dir / name,
                             progress=progress, checkpoint=False, mesh=mesh)
    rows.append(_report.table_row(result, setup.metric))
  table = _report.format_table(rows)
  typer.echo(f"\n{model} on {task}: final average rank budget {budget_rank} per matrix "
             f"(capacity {rank}), {steps} steps x batch {batch_size}, {max_length} tokens")
  typer.echo(table)
  typer.echo(f"total wall time {time.perf_counter() - start:.0f} s; heatmaps in {output_dir}/")
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "table.md").write_text(table + "\n")


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(..., help="a jaxrank finetune --output-dir (or its adapter/)"),
    model: str = typer.Option("minilm", help="the --model the run was fine-tuned with: minilm, "
                                             "smollm2 or PATH (a local Hugging Face folder)"),
    format: str = typer.Option("hf", help="hf (a Hugging Face PyTorch checkpoint that "
                                          "from_pretrained loads) and/or gguf (LLaMA models "
                                          "loaded from a GGUF), comma-separated"),
    output_dir: Path = typer.Option(Path("runs/export"), help="where hf/ and model.gguf go"),
    tensor_type: Optional[str] = typer.Option(
        None, help="GGUF tensor type: F32 or F16 for every tensor (default: each tensor in its "
                   "source type where gguf can write it, else F16/F32)"),
):
  """Merge a fine-tuned run's adapter into its base model: HF checkpoint and/or GGUF."""
  _check_numbers(output_dir)
  _configure_jax()
  from jaxrank import _export_command
  formats = tuple(f.strip() for f in format.split(",") if f.strip())
  try:
    written = _export_command.export_run(run_dir, model=model, formats=formats,
                                         output_dir=output_dir, tensor_type=tensor_type)
  except ValueError as error:
    raise typer.BadParameter(str(error)) from None
  for name, path in written.items():
    typer.echo(f"  {name}: {path}")


@app.command("setup-data")
def setup_data(cache_dir: Optional[Path] = typer.Option(
    None, help="where to extract (default: $JAXRANK_DATA or ~/.cache/jaxrank)")):
  """One-time set-up: extract Jane Austen's novels from Debian's r-cran-janeaustenr."""
  from jaxrank.data import austen
  path = austen.setup(cache_dir)
  typer.echo(f"Jane Austen novels ready in {path}")


def main():
  app()


if __name__ == "__main__":
  main()
