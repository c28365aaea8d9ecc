import pathlib
import sys

# Make tests/multidevice.py importable as a plain module.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# scripts that tests launch as separate processes: they parse argv and start jax.distributed
# at import, so doctest collection must not import them
collect_ignore = ["multiprocess_script.py"]
