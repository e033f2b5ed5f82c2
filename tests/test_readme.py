"""The README's Python examples run as written, and its Quickstart is what CI runs."""

import re
import subprocess
from pathlib import Path

import pytest
from helpers import require

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code):
    if "Tokenizer" in code:
        require("tokenizers", "ftfy", "regex")
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_quickstart():
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"^quickstart=\$\((.*)\)$", script, flags=re.M).group(1)
    commands = subprocess.run(
        ["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert len(commands) == 3
    assert "fastclip train" in commands[0]  # the main job comes first
    assert "fastclip-demo" in commands[1] and "pytest" in commands[2]
    assert all(c.startswith('pip install -e ".[dev]"') for c in commands)
