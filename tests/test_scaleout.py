"""Identical rank decisions on 1 and 8 (simulated) devices, for every method."""

import json
import os

import pytest

import method_configs
from multidevice import run_on_devices

SCRIPT = os.path.join(os.path.dirname(__file__), "scaleout_script.py")
METHODS = sorted(m for m in method_configs.CONFIGS if m != "lora_dropout")


@pytest.mark.parametrize("method", METHODS)
def test_one_vs_eight_devices(method):
  code = f"import runpy, sys; sys.argv = [{SCRIPT!r}, {method!r}, '24']; runpy.run_path({SCRIPT!r}, run_name='__main__')"
  report = json.loads(run_on_devices(code).strip().splitlines()[-1])
  for layout in ("data", "tensor", "explicit", "explicit_tensor", "pmap"):
    result = report[layout]
    assert result["same_pattern"], (layout, report)
    assert result["replicas_agree"], (layout, report)
    assert result["max_lora_diff"] < 1e-4, (layout, report)
    assert result["max_gate_diff"] < 1e-4, (layout, report)
