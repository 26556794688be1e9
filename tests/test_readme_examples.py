"""The README's Python examples run in the venv that scripts/install.sh builds: every
module they import is installed (issue 20: the openai example failed in run.sh's venv)."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def example_imports() -> set[str]:
    """Top-level modules imported by the README's ```python blocks."""
    modules: set[str] = set()
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_module_the_readme_examples_import_is_installed() -> None:
    modules = example_imports()
    assert "openai" in modules  # the OpenAI SDK example is there
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"README examples import {missing}, which scripts/install.sh does not install"


def test_the_install_script_installs_the_examples_extra() -> None:
    script = (README.parent / "scripts" / "install.sh").read_text()
    assert 'extras="[examples]"' in script and "[dev,examples]" in script
    assert "examples = [" in (README.parent / "pyproject.toml").read_text()
