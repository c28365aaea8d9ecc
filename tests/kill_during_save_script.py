"""Saves step 1, then step 2 of a 16 MB state, telling the parent when each save starts/ends.

python kill_during_save_script.py DIR

Used by test_checkpoint_integrity.py, which SIGKILLs this process at a random moment of the
second save and checks that step 1 still restores bit-identically.
"""

import sys
import time

import jax.numpy as jnp

from jaxrank import checkpoint


def state(value):
  return {"w": jnp.arange(4_000_000, dtype=jnp.float32) * value, "step": jnp.array(int(value))}


def main():
  directory = sys.argv[1]
  start = time.perf_counter()
  checkpoint.save(directory, 1, state(1.0))
  print(f"SAVED 1 {time.perf_counter() - start:.3f}", flush=True)
  print("SAVING 2", flush=True)
  checkpoint.save(directory, 2, state(2.0))
  print("SAVED 2", flush=True)


if __name__ == "__main__":
  main()
