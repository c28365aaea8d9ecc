"""jaxrank methods as the optimizer of tunix's PeftTrainer (google-tunix 0.1.7) on a tiny NNX LLaMA.

Run in a separate venv holding google-tunix (its safetensors<0.8 pin would downgrade jaxrank's):
    python benchmarks/tunix_interop.py METHOD [--lora-gates]
It prints the first and last training loss; the README's tunix sentence comes from it.
"""
import sys, numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
import jaxrank
from jaxrank import _nnx_train
from jaxrank.models import llama_nnx
from tunix.sft import peft_trainer

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
            max_position_embeddings=64, tie_word_embeddings=True)
rng = np.random.default_rng(1)
def batches(n):
  for _ in range(n):
    ids = rng.integers(0, 8, (8, 12)).astype(np.int32)
    yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}
task = llama_nnx.causal_lm_task()
method = sys.argv[1]
steps = 30
model = llama_nnx.LlamaForCausalLM(llama_nnx.LlamaConfig.from_dict(TINY), rngs=nnx.Rngs(0))
options = dict(rank=4, budget_rank=2, total_steps=steps) if method != "lora" else dict(rank=2)
recipe = jaxrank.recipe(method, **options)
gate_type = jaxrank.nnx.LoRAGate if "--lora-gates" in sys.argv else jaxrank.nnx.Gate
jaxrank.nnx.wrap(model, ["q_proj", "v_proj"], recipe.adapter, rngs=nnx.Rngs(1), gate_type=gate_type)
_nnx_train.prepare(model, recipe)
from jaxrank._recipe import RecipeContext
from jaxrank._heads import warmup_linear_schedule
live = {"split": nnx.split(model, jaxrank.nnx.TRAINABLE, ...)}  # concrete frozen base: jit constants
ctx = RecipeContext(model=model, total_steps=steps, learning_rate=3e-2,
                    schedule=warmup_linear_schedule(3e-2, steps),
                    loss_fn=_nnx_train._trainable_loss_fn(task, live),
                    validation_batch=next(batches(1)), num_matrices=4)
tx = jaxrank.nnx.transform(recipe.optimizer(ctx))
base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, jaxrank.nnx.BASE)))
gates_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, jaxrank.nnx.Gate)))
adapter = jaxrank.nnx.adapter_of(model)
def loss_fn(model, input_ids, attention_mask):
  batch = {"input_ids": input_ids, "attention_mask": attention_mask}
  loss = task.loss(task.apply(model, batch), batch)
  if recipe.penalty is not None:
    loss = loss + recipe.penalty(adapter, jaxrank.nnx.to_linen_variables(model))
  return loss
try:
  trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(
      eval_every_n_steps=1000, max_steps=steps, pbar_description=None)).with_loss_fn(loss_fn)
  print("optimizer wrt:", trainer.optimizer.wrt)
  held = next(batches(1))
  before = loss_fn(model, **held)
  trainer.train(batches(steps))
  after = loss_fn(model, **held)
  base_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, jaxrank.nnx.BASE)))
  gates_after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, jaxrank.nnx.Gate)))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  print(f"RESULT {method}: loss {float(before):.4f} -> {float(after):.4f}; base frozen: "
        f"{same(base_before, base_after)}; gates changed: {not same(gates_before, gates_after) if jax.tree.leaves(gates_before) else 'no gates'}; "
        f"rank pattern {jaxrank.nnx.rank_pattern(model)}")
except Exception as e:
  import traceback; traceback.print_exc()
  print(f"RESULT {method}: FAILED {type(e).__name__}: {str(e)[:400]}")
