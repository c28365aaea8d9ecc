"""The ``jaxrank`` command: fine-tune real models offline, compare the rank methods.

Commands (``jaxrank --help``, ``jaxrank COMMAND --help``):

* ``jaxrank finetune --model minilm --task bbc-news --method lora`` fine-tunes with one method
  and writes, under ``--output-dir``: ``metrics.json`` (final metrics, history, rank pattern),
  ``rank_heatmap.png``, ``checkpoint/`` (orbax) and ``adapter/`` (pruned plain-LoRA factors as
  safetensors + config).
* ``jaxrank finetune --model smollm2 --task austen`` causal-LM fine-tuning; reports perplexity.
* ``jaxrank demo`` runs the frozen-model baseline and every method at one equal final rank
  budget on BBC News, prints one comparison table and writes the heatmaps.
* ``jaxrank setup-data`` extracts the Debian Jane Austen package into the data cache (once).

``--model tiny-bert --task synthetic`` is a seconds-long random model and task for smoke tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Dynamic-rank LoRA (SoRA, AdaLoRA, SaLoRA, ALoRA) for JAX/Flax.")

METHODS = ("lora", "sora", "adalora", "salora", "alora")


# --- methods at a rank budget -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """Knobs shared by the method builders.

  ``rank`` is the per-matrix capacity of the dynamic methods (``r_max``); ``budget_rank`` is
  the final *average* rank per adapted matrix that every method ends at (plain LoRA trains
  exactly that rank).
  """

  rank: int = 8
  budget_rank: int = 4
  alpha: Optional[float] = None
  sora_lambda: float = 0.1
  salora_lambda_lr: float = 1.0
  adalora_lr_factor: float = 5.0
  alora_rounds: int = 2
  alora_scoring_examples: int = 8
  # ranks scored per vmapped call in an ALoRA round (that call runs 2 x chunk x scoring rows
  # sequences at once). None: 1 on CPU, where one pair of forwards at a time is fastest and
  # needs the least memory (MiniLM round 16 s vs 32 s at 32, benchmarks/README.md), else 32.
  alora_chunk_size: Optional[int] = None


def build_method(name: str, options: MethodOptions, steps: int):
  """The :class:`jaxrank.train.Method` named ``name`` at the options' final rank budget."""
  from jaxrank import train
  if name == "frozen":
    return train.frozen_method()
  if name == "lora":
    return train.lora_method(rank=options.budget_rank, alpha=options.alpha)
  builders = {"sora": _sora, "adalora": _adalora, "salora": _salora, "alora": _alora}
  if name not in builders:
    raise typer.BadParameter(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
  return builders[name](options, steps)


def _module(name: str):
  """The method module ``jaxrank.<name>`` (the package may re-export a function by that name)."""
  import importlib
  return importlib.import_module(f"jaxrank._{name}")


def _alpha(options, rank):
  return float(2 * rank if options.alpha is None else options.alpha)


def _sora(options: MethodOptions, steps: int):
  """SoRA: proximal gates; a final top-budget cut keeps at most the budget (reported)."""
  import optax
  from jaxrank import train
  sora = _module("sora")
  spec = sora.SoRA(rank=options.rank, alpha=_alpha(options, options.rank))

  def optimizer(ctx):
    return optax.chain(optax.adamw(ctx.schedule, weight_decay=0.0),
                       sora.sora_prox(options.sora_lambda, ctx.schedule))

  def finalize(model, variables, opt_state):
    # |g| ranks the ranks; dropped ones get g = 0 (SoRA's own pruned value)
    return cap_to_budget(model, variables, options.budget_rank, "g",
                         score=lambda g: np.abs(g), dropped=lambda g: np.zeros_like(g))

  return train.Method(name="sora", adapter=spec, optimizer=optimizer, finalize=finalize)


def cap_to_budget(model, variables, budget_rank: int, gate_name: str, *, score, dropped):
  """Keeps at most ``budget_rank × n_matrices`` live ranks over the whole network.

  When the method ended with more live ranks than the budget, the live ranks with the highest
  ``score(gate)`` are kept and every other rank's gate entry is replaced by ``dropped(gate)``
  (a value whose rank mask is False). A method already at or under the budget is unchanged.
  This makes the demo's comparison one of *equal final budgets*; the number of ranks it cut
  is reported by the demo.
  """
  import jax.numpy as jnp
  from flax import traverse_util
  from jaxrank import _variables
  layers = _variables.adapter_layers(model, variables)
  masks = _variables.rank_masks(model, variables)
  budget = budget_rank * len(layers)
  alive = sum(int(np.sum(np.asarray(m))) for m in masks.values())
  if alive <= budget:
    return variables
  scores = np.concatenate([np.where(np.asarray(masks[p]), score(np.asarray(l.gates[gate_name])),
                                    -np.inf).reshape(-1) for p, l in layers.items()])
  order = np.argsort(-scores, kind="stable")
  keep = np.zeros(scores.shape, bool)
  keep[order[:budget]] = True
  flat = traverse_util.flatten_dict(dict(variables["gates"]))
  start = 0
  for path, layer in layers.items():
    key = tuple(path.split("/")) + (gate_name,)
    g = np.asarray(flat[key])
    k = keep[start:start + g.size].reshape(g.shape)
    start += g.size
    flat[key] = jnp.asarray(np.where(k, g, dropped(g)), flat[key].dtype)
  return {**variables, "gates": traverse_util.unflatten_dict(flat)}


def _adalora(options: MethodOptions, steps: int):
  import optax
  from jaxrank import _regularizers, train
  adalora = _module("adalora")
  spec = adalora.AdaLoRA(rank=options.rank, alpha=_alpha(options, options.rank))

  def optimizer(ctx):
    tinit, tfinal = max(1, steps // 10), max(1, steps // 5)
    # PEFT's initialisation (P, Q ~ N(0, 0.02^2), Λ = 0) starts the update far smaller than
    # LoRA's, so AdaLoRA's factors take a larger step: ``adalora_lr_factor`` x the demo's
    # learning rate (5 x 2e-3 = 1e-2 reached 96.8 % test accuracy in 60 steps, against
    # 91.4 % -- no better than the frozen encoder -- at 2e-3). The head keeps the common rate.
    schedule = lambda step: options.adalora_lr_factor * ctx.schedule(step)
    return adalora.adalora(optax.adamw(schedule, weight_decay=0.0), init_r=options.rank,
                           target_r=options.budget_rank, tinit=tinit, tfinal=tfinal,
                           total_step=steps, deltaT=max(1, steps // 50))

  def penalty(model, variables):
    return 0.1 * _regularizers.orthogonality_penalty(model, variables, form="paper")

  def pattern(model, variables, opt_state):
    return {k: int(v.sum()) for k, v in adalora.adalora_rank_pattern(opt_state).items()}

  return train.Method(name="adalora", adapter=spec, optimizer=optimizer, penalty=penalty,
                      rank_pattern=pattern)


def _salora(options: MethodOptions, steps: int):
  import optax
  from jaxrank import train
  salora = _module("salora")
  spec = salora.SaLoRA(rank=options.rank, alpha=_alpha(options, options.rank))
  density = options.budget_rank / options.rank

  def optimizer(ctx):
    return salora.lagrangian_ascent(options.salora_lambda_lr,
                                    optax.adamw(ctx.schedule, weight_decay=0.0),
                                    t_start=0, t_end=max(1, int(steps * 0.8)))

  return train.Method(
      name="salora", adapter=spec, optimizer=optimizer,
      penalty=lambda model, v: salora.salora_penalty(model, v, target_density=density),
      prepare=lambda model, v: salora.add_lagrange_multiplier(v),
      finalize=lambda model, v, s: cap_to_budget(
          model, salora.salora_harden(model, v, rule="budget"), options.budget_rank, salora.LOG_THETA,
          score=lambda t: t, dropped=lambda t: np.full_like(t, -salora.HARD_LOG_THETA)),
      train_rngs=("dropout", salora.HARD_CONCRETE_RNG))


def _first(batch, n: int):
  """The first ``n`` rows of a batch (ALoRA scores every live rank with 2 forwards on it)."""
  return None if batch is None else {k: v[:n] for k, v in batch.items()}


def _alora_chunk_size(options: MethodOptions) -> int:
  if options.alora_chunk_size is not None:
    return options.alora_chunk_size
  import jax
  return 1 if jax.default_backend() == "cpu" else 32


def _alora(options: MethodOptions, steps: int):
  import optax
  from jaxrank import train
  alora = _module("alora")
  spec = alora.ALoRA(rank=options.rank, initial_rank=options.budget_rank,
                     alpha=_alpha(options, options.budget_rank))
  rounds = options.alora_rounds
  warmup = max(1, steps // 4)
  recovery = max(1, (steps - warmup) // (rounds + 1))

  def optimizer(ctx):
    # n_A: half the matrices per round, so that some modules lose none and receive the freed
    # ranks (with n_A = all matrices, ranks spread over every module are simply lost).
    per_round = max(1, ctx.num_matrices // 2)
    return alora.alora(optax.adamw(ctx.schedule, weight_decay=0.0), spec, ctx.loss_fn,
                       warmup_steps=warmup, recovery_steps=recovery, num_rounds=rounds,
                       ranks_per_round=per_round, total_steps=steps,
                       validation_batch=_first(ctx.validation_batch,
                                               options.alora_scoring_examples),
                       chunk_size=_alora_chunk_size(options))

  return train.Method(name="alora", adapter=spec, optimizer=optimizer, separate_head=False)


# --- models and tasks ------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """A base model, its task and its data as arrays."""

  base: object
  variables: dict
  task: object
  head: tuple
  targets: object
  train_data: dict
  eval_data: dict
  test_data: Optional[dict]
  metric: str


def _tiny_bert_setup(seed: int, train_examples: int, max_length: int) -> Setup:
  """A random 2-layer BERT on a synthetic 'which marker token appears' task."""
  import numpy as np
  import transformers
  from jaxrank.models import bert
  config = transformers.BertConfig(
      vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=max(max_length, 16), num_labels=3)
  hf = transformers.FlaxBertForSequenceClassification(config, seed=seed)
  rng = np.random.default_rng(seed)

  def make(n):
    ids = rng.integers(10, 64, size=(n, max_length)).astype(np.int32)
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    ids[:, 0] = 1
    ids[np.arange(n), rng.integers(1, max_length, size=n)] = 2 + labels  # the marker token
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids), "labels": labels}

  return Setup(hf.module, {"params": hf.params}, bert.classification_task(),
               bert.HEAD_MODULES, list(bert.ALL_TARGETS), make(train_examples),
               make(max(16, train_examples // 4)), make(max(16, train_examples // 4)),
               "accuracy")


def _minilm_setup(seed: int, train_examples: int, max_length: int,
                  eval_examples: int = 0) -> Setup:
  from jaxrank.data import bbc_news
  from jaxrank.models import bert
  splits = bbc_news.load_bbc_news()
  hf, tokenizer = bert.load_minilm(num_labels=splits["train"].num_labels, seed=seed)
  take = lambda split, n: split.take(n) if n else split
  arrays = lambda split, n: bert.tokenize_classification(tokenizer, take(split, n), max_length)
  return Setup(hf.module, {"params": hf.params}, bert.classification_task(), bert.HEAD_MODULES,
               list(bert.ALL_TARGETS), arrays(splits["train"], train_examples),
               arrays(splits["validation"], eval_examples),
               arrays(splits["test"], eval_examples), "accuracy")


def _smollm2_setup(seed: int, train_examples: int, max_length: int,
                   eval_examples: int = 0) -> Setup:
  from jaxrank.data import austen
  from jaxrank.models import llama
  hf, tokenizer = llama.load_smollm2()
  splits = austen.load_austen_chunks(tokenizer, max_length=max_length)
  take = lambda data, n: {k: v[:n] for k, v in data.items()} if n else data
  return Setup(hf.module, {"params": hf.params}, llama.causal_lm_task(), (),
               list(llama.ATTENTION_TARGETS), take(splits["train"], train_examples),
               take(splits["validation"], eval_examples or 64),
               take(splits["test"], eval_examples or 64), "perplexity")


def load_setup(model: str, task: str, *, seed: int, train_examples: int, max_length: int,
               eval_examples: int = 0) -> Setup:
  pairs = {("tiny-bert", "synthetic"): _tiny_bert_setup,
           ("minilm", "bbc-news"): _minilm_setup,
           ("smollm2", "austen"): _smollm2_setup}
  if (model, task) not in pairs:
    raise typer.BadParameter(
        f"--model {model} --task {task} is not available; use one of "
        + ", ".join(f"--model {m} --task {t}" for m, t in pairs))
  fn = pairs[(model, task)]
  if model == "tiny-bert":
    return fn(seed, train_examples or 64, max_length)
  return fn(seed, train_examples, max_length, eval_examples)


# --- running and reporting --------------------------------------------------------------------
def run_one(setup: Setup, method, *, steps: int, batch_size: int, learning_rate: float,
            head_learning_rate: Optional[float], eval_every: int, seed: int,
            output_dir: Optional[Path], progress: bool = True, checkpoint: bool = True,
            eval_at_start: bool = False, mesh=None):
  """Trains ``method``; writes metrics, heatmap, checkpoint and adapter under ``output_dir``."""
  from jaxrank import plots, train

  def on_eval(step, record, state):
    if checkpoint and output_dir is not None:
      train.save_checkpoint(output_dir / "checkpoint", state)

  result = train.fit(
      setup.base, setup.variables, method, setup.task, train_data=setup.train_data,
      eval_data=setup.eval_data, test_data=setup.test_data, steps=steps,
      batch_size=batch_size, eval_every=eval_every, learning_rate=learning_rate,
      head_learning_rate=head_learning_rate, head=setup.head, targets=setup.targets,
      seed=seed, progress=progress, on_eval=on_eval, eval_at_start=eval_at_start, mesh=mesh)
  if output_dir is not None:
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"method": method.name, "final_metrics": result.final_metrics,
               "rank_pattern": result.rank_pattern,
               "trainable_parameters": result.trainable_parameters,
               "head_parameters": result.head_parameters, "wall_time_s": result.wall_time,
               "live_ranks_before_finalize": result.live_ranks_before_finalize,
               "history": result.history}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if result.rank_pattern:
      plots.rank_heatmap(result.rank_pattern, output_dir / "rank_heatmap.png",
                         title=f"{method.name}: learned rank per matrix",
                         max_rank=method.adapter.rank)
    if checkpoint:
      train.save_checkpoint(output_dir / "checkpoint", result.state)
    train.export_adapter(result, output_dir / "adapter")
  return result


def _total_rank(pattern) -> int:
  import numpy as np
  return int(sum(np.sum(v) for v in pattern.values()))


def format_table(rows: list[dict]) -> str:
  """A Markdown table (what ``jaxrank demo`` prints and the README shows)."""
  headers = list(rows[0])
  widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
  line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(headers), sep] + [line([r[h] for h in headers]) for r in rows])


def _row(result, metric: str) -> dict:
  m = result.final_metrics
  pattern = result.rank_pattern
  ranks = sorted(int(v) for v in pattern.values()) if pattern else []
  rank_text = f"{_total_rank(pattern)} (min {ranks[0]}, max {ranks[-1]})" if ranks else "-"
  before = result.live_ranks_before_finalize
  if before is not None and before != _total_rank(pattern):
    rank_text += f", {before} before cut"
  value = lambda k: f"{100 * m[k]:.2f}" if metric == "accuracy" else f"{m[k]:.3f}"
  return {"method": result.method.name,
          f"val {metric}": value(f"eval_{metric}") if f"eval_{metric}" in m else "-",
          f"test {metric}": value(f"test_{metric}") if f"test_{metric}" in m else "-",
          "adapter params": f"{result.trainable_parameters:,}",
          "total rank": rank_text,
                "wall s": f"{result.wall_time:.0f}"}


# --- commands -----------------------------------------------------------------------------
CPU_DEVICES_HELP = ("split the CPU into N XLA devices (0: one per core) and train data-parallel "
                    "over them: faster on multi-core CPUs (benchmarks/README.md); batch sizes "
                    "must be multiples of N")


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
    model: str = typer.Option("minilm", help="minilm | smollm2 | tiny-bert"),
    task: str = typer.Option("bbc-news", help="bbc-news (minilm) | austen (smollm2) | synthetic"),
    method: str = typer.Option("lora", help="lora | sora | adalora | salora | alora | frozen"),
    rank: int = typer.Option(8, help="per-matrix rank capacity r_max of the dynamic methods"),
    budget_rank: int = typer.Option(4, help="final average rank per adapted matrix"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default 2 x rank)"),
    steps: int = typer.Option(200, help="optimizer steps"),
    batch_size: int = typer.Option(16),
    max_length: int = typer.Option(128, help="tokens per example (longer texts truncated)"),
    learning_rate: float = typer.Option(1e-3, "--lr"),
    head_learning_rate: Optional[float] = typer.Option(None, "--head-lr"),
    eval_every: int = typer.Option(50, help="evaluate on the validation split every N steps"),
    train_examples: int = typer.Option(0, help="use the first N training examples (0: all)"),
    eval_examples: int = typer.Option(0, help="use the first N validation/test examples (0: all)"),
    sora_lambda: float = typer.Option(0.1, help="SoRA sparsity strength (prox threshold)"),
    seed: int = typer.Option(0),
    output_dir: Path = typer.Option(Path("runs/finetune"), help="where results are written"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    eval_at_start: bool = typer.Option(False, help="also evaluate the model before training"),
    cpu_devices: int = typer.Option(1, help=CPU_DEVICES_HELP),
):
  """Fine-tune one method and report metrics, the learned rank pattern and a heatmap."""
  mesh = _configure_jax(cpu_devices, batch_size)
  if method not in METHODS + ("frozen",):
    raise typer.BadParameter(f"--method must be one of {', '.join(METHODS + ('frozen',))}.")
  setup = load_setup(model, task, seed=seed, train_examples=train_examples,
                     max_length=max_length, eval_examples=eval_examples)
  options = MethodOptions(rank=rank, budget_rank=budget_rank, alpha=alpha,
                          sora_lambda=sora_lambda)
  built = build_method(method, options, steps)
  result = run_one(setup, built, steps=steps, batch_size=batch_size,
                   learning_rate=learning_rate, head_learning_rate=head_learning_rate,
                   eval_every=eval_every, seed=seed, output_dir=output_dir, progress=progress,
                   eval_at_start=eval_at_start, mesh=mesh)
  typer.echo(f"\nmethod {method} on {model}/{task}, {steps} steps, {result.wall_time:.1f} s")
  if eval_at_start:
    before = {k: v for k, v in result.history[0].items() if k.startswith("eval_")}
    typer.echo("  before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
  for k, v in result.final_metrics.items():
    typer.echo(f"  {k}: {v:.4f}")
  typer.echo(f"  adapter parameters (live ranks): {result.trainable_parameters:,}; "
             f"head parameters: {result.head_parameters:,}")
  if result.rank_pattern:
    typer.echo(f"  total rank {_total_rank(result.rank_pattern)} over "
               f"{len(result.rank_pattern)} matrices"
               + (f" ({result.live_ranks_before_finalize} live before the method's final step)"
                  if result.live_ranks_before_finalize is not None else ""))
    for path, r in result.rank_pattern.items():
      typer.echo(f"    {path}: {r}")
  typer.echo(f"  results in {output_dir}/ (metrics.json, rank_heatmap.png, checkpoint/, adapter/)")


@app.command()
def demo(
    methods: str = typer.Option("frozen,lora,sora,adalora,salora,alora",
                                help="comma-separated methods to compare"),
    model: str = typer.Option("minilm"),
    task: str = typer.Option("bbc-news"),
    rank: int = typer.Option(8, help="rank capacity r_max of the dynamic methods"),
    budget_rank: int = typer.Option(4, help="the equal final average rank per matrix"),
    steps: int = typer.Option(60),
    batch_size: int = typer.Option(16),
    max_length: int = typer.Option(64),
    learning_rate: float = typer.Option(2e-3, "--lr"),
    head_learning_rate: Optional[float] = typer.Option(None, "--head-lr"),
    train_examples: int = typer.Option(0, help="first N training examples (0: all)"),
    eval_examples: int = typer.Option(0, help="first N validation/test examples (0: all)"),
    seed: int = typer.Option(0),
    output_dir: Path = typer.Option(Path("runs/demo")),
    progress: bool = typer.Option(True),
    cpu_devices: int = typer.Option(1, help=CPU_DEVICES_HELP),
):
  """All methods at one equal final rank budget on BBC News: one table, one heatmap each."""
  mesh = _configure_jax(cpu_devices, batch_size)
  start = time.perf_counter()
  setup = load_setup(model, task, seed=seed, train_examples=train_examples,
                     max_length=max_length, eval_examples=eval_examples)
  options = MethodOptions(rank=rank, budget_rank=budget_rank)
  rows = []
  for name in [m.strip() for m in methods.split(",") if m.strip()]:
    built = build_method(name, options, steps)
    result = run_one(setup, built, steps=steps, batch_size=batch_size,
                     learning_rate=learning_rate, head_learning_rate=head_learning_rate,
                     eval_every=0, seed=seed, output_dir=output_dir / name,
                     progress=progress, checkpoint=False, mesh=mesh)
    rows.append(_row(result, setup.metric))
  table = format_table(rows)
  typer.echo(f"\n{model} on {task}: final average rank budget {budget_rank} per matrix "
             f"(capacity {rank}), {steps} steps x batch {batch_size}, {max_length} tokens")
  typer.echo(table)
  typer.echo(f"total wall time {time.perf_counter() - start:.0f} s; heatmaps in {output_dir}/")
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / "table.md").write_text(table + "\n")


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
