import pathlib
import sys

# Make tests/multidevice.py importable as a plain module.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
