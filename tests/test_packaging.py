"""Packaging and layout: the four generic folders install as breathcast.*, and the core imports none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("stream", "engine", "training", "calibration")


def test_generic_folders_import_only_under_breathcast(tmp_path):
    """From outside the repository, breathcast.stream etc. import and top-level stream etc. do not exist."""
    code = (
        "import importlib.util as u, json;"
        f"print(json.dumps({{n: [u.find_spec(n) is None, u.find_spec('breathcast.' + n).origin] for n in {SUBPACKAGES!r}}}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    import json

    found = json.loads(result.stdout)
    for name in SUBPACKAGES:
        top_level_missing, origin = found[name]
        assert top_level_missing, f"'{name}' must not be importable as a top-level package"
        assert Path(origin) == ROOT / name / "__init__.py"


# The command line is the composition root (DESIGN.md puts it in the core folder): it alone dispatches to every
# layer, importing them inside the subcommand that needs them, so the core library stays free of them.
CORE_MODULES = sorted(p for p in (ROOT / "breathcast").glob("*.py") if p.name != "cli.py")


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_imports_none_of_the_upper_layers(path):
    """Dependency direction: the core library never imports stream, engine, training or calibration."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    upper = {f"breathcast.{name}" for name in SUBPACKAGES}
    assert not {m for m in imported if any(m == u or m.startswith(u + ".") for u in upper)}


def test_cli_imports_upper_layers_only_inside_subcommands():
    """Importing the CLI module pulls in no upper layer (they load when their subcommand runs)."""
    code = "import sys, breathcast.cli; print(sorted(m for m in sys.modules if m.startswith('breathcast.training')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
