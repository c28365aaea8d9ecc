"""Run a snippet on simulated CPU devices in a fresh process (the flag must precede jax import)."""

import os
import subprocess
import sys
import textwrap


def run_on_devices(code: str, devices: int = 8, timeout: int = 600) -> str:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      env=env, capture_output=True, text=True, timeout=timeout,
  )
  if result.returncode != 0:
    raise AssertionError(f"subprocess failed:\n{result.stdout}\n{result.stderr}")
  return result.stdout
