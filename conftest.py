"""Doctests run over the package too (pytest --doctest-modules, see pyproject.toml)."""

import importlib.util

# Modules whose doctests need optional extras; skipped when those are not installed.
_OPTIONAL = {
    "jaxrank/models": ("transformers", "gguf"),
    "jaxrank/data": ("rdata",),
    "jaxrank/cli.py": ("typer", "transformers"),
    "jaxrank/plots.py": ("matplotlib",),
    "jaxrank/train.py": ("tqdm",),
    "jaxrank/peft_io.py": ("safetensors",),
}

collect_ignore = [
    path for path, modules in _OPTIONAL.items()
    if any(importlib.util.find_spec(m) is None for m in modules)
]
collect_ignore += ["benchmarks", "examples"]
