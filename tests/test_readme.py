"""The README's code is real: its first Python block runs and prints what it says."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  text = README.read_text()
  block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, "README.md", "exec"), {})
  assert out.getvalue().strip() == "{'hidden': 8, 'out': 8}"


def test_readme_starts_with_exactly_two_setup_commands():
  lines = README.read_text().splitlines()
  start = lines.index("```bash")
  block = lines[start + 1 : lines.index("```", start + 1)]
  commands = [l for l in block if not l.startswith("#")]
  assert len(commands) == 2
  assert block[0] == "# install and run the main job"
  assert block[2] == "# install and run the tests"
