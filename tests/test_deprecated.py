"""The 0.1 spellings keep working for one release and warn (jaxrank/_deprecated.py)."""

import importlib

import pytest

import jaxrank


@pytest.mark.parametrize("old, new", [
    ("jaxrank.adalora.rank_pattern_from_state", "adalora_rank_pattern"),
    ("jaxrank.adalora.find_state", "find_adalora_state"),
    ("jaxrank.alora.ablation_scores_naive", "ablation_scores_naive"),
    ("jaxrank.alora.reset_optimizer_state", "alora_reset_optimizer_state"),
    ("jaxrank.sora.lambda_values", "sora_lambda_values"),
    ("jaxrank.salora.penalty", "salora_penalty"),
    ("jaxrank.salora.harden", "salora_harden"),
])
def test_old_attribute_spellings_warn_and_resolve(old, new):
  _, module, name = old.split(".")
  with pytest.warns(DeprecationWarning, match=f"use jaxrank.{new}"):
    value = getattr(getattr(jaxrank, module), name)
  assert value is getattr(jaxrank, new)


def test_old_from_imports_warn():
  with pytest.warns(DeprecationWarning, match="jaxrank.sora.SoRA"):
    from jaxrank.sora import SoRA
  assert SoRA is jaxrank.SoRA
  with pytest.warns(DeprecationWarning, match="rank_pattern_from_state"):
    from jaxrank.adalora import rank_pattern_from_state
  assert rank_pattern_from_state is jaxrank.adalora_rank_pattern
  with pytest.warns(DeprecationWarning):
    assert importlib.import_module("jaxrank.salora").LOG_THETA == "log_theta"


def test_transforms_are_functions_and_unknown_names_fail_clearly():
  assert jaxrank.adalora.__name__ == "adalora" and callable(jaxrank.alora)
  assert jaxrank.adalora.__doc__ == jaxrank._adalora.adalora.__doc__
  with pytest.raises(AttributeError, match="deprecated"):
    jaxrank.alora.no_such_name
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    jaxrank.sora.nothing


def test_no_public_name_is_both_a_module_and_a_function():
  import types
  for name in jaxrank.__all__:
    value = getattr(jaxrank, name)
    if isinstance(value, types.ModuleType):
      assert not callable(value), name
