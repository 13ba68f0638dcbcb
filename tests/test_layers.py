"""The package's layers are a checked contract (pyproject.toml [tool.importlinter], `make lint`):
the tree keeps them, and an import against them is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the contracts of ``root/pyproject.toml``."""
    return subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_an_upward_import_lightning_in_models_and_a_cycle_are_caught(tmp_path):
    shutil.copytree(REPO / "med3dvlm", tmp_path / "med3dvlm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for module, line in {
        "stages/vlm.py": "from med3dvlm.evaluation import generate",  # a stage reaching up into the evaluation
        "models/losses.py": "import lightning",  # a plain nn.Module file depending on Lightning
        "data/layout.py": "import experiments.pipeline",  # the package importing a research script
        "data/samples.py": "import med3dvlm.data.m3d",  # a cycle: m3d reads samples, samples m3d
    }.items():
        path = tmp_path / "med3dvlm" / module
        path.write_text(path.read_text() + f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "0 kept, 4 broken" in result.stdout
    assert "med3dvlm.stages.vlm -> med3dvlm.evaluation.generate" in result.stdout
    assert "med3dvlm.models.losses -> lightning" in result.stdout
    assert "med3dvlm.data.layout -> experiments" in result.stdout
    assert "No cycles are allowed in med3dvlm.data" in result.stdout
