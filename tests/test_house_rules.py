"""The house rules, checked with the suite: the layers, ruff, and functions that say why they are
long."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)


def test_layers_import_only_downward_and_no_module_cycles():
    """The import-linter contracts in pyproject.toml: the layers, and no cycle between sibling
    modules."""
    done = run(str(BIN / "lint-imports"), "--no-cache")
    assert done.returncode == 0 and "2 kept, 0 broken" in done.stdout, done.stdout + done.stderr


def test_ruff_check_and_format_are_clean():
    checked = run(sys.executable, "-m", "ruff", "check", "--output-format", "concise", ".")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    formatted = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert formatted.returncode == 0, "run `ruff format .`:\n" + formatted.stdout + formatted.stderr


def test_no_function_over_50_lines_without_a_reason():
    """A function of more than 50 lines states why in a `# long:` comment."""
    unexplained = []
    for path in sorted((ROOT / "peftc").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno >= 50
            ):
                body = lines[node.lineno - 1 : node.end_lineno]
                if not any("# long:" in line for line in body):
                    unexplained.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(body)} lines)"
                    )
    assert not unexplained, "split these, or say why in a `# long:` comment:\n" + "\n".join(
        unexplained
    )


def test_no_module_imports_another_modules_private_names():
    """What one module uses of another is public there (named without a leading underscore)."""
    crossing = []
    for path in sorted((ROOT / "peftc").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftc"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and not all(name in ("__version__",) for name in private):
                    crossing.append(
                        f"{path.relative_to(ROOT)}: from {node.module} import {private}"
                    )
    assert not crossing, "make these public, or move them to where they are used:\n" + "\n".join(
        crossing
    )
