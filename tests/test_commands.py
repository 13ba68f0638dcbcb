"""Every ``python -m med3dvlm.<verb>`` is a thin top-level Hydra command built by
:func:`med3dvlm.cli.hydra_command`: ``--help`` shows its usage, an unknown key is one line with
status 2, and no command lives anywhere else or parses its arguments another way."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "med3dvlm"
# the commands the README documents, each with configs/<verb>.yaml
COMMANDS = ["app", "check", "demo", "eval", "export", "phantoms", "predict", "prepare", "train", "wordnet"]


def runs_as_main(path: Path) -> bool:
    """True when the module has an ``if __name__ == "__main__":`` block."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            return True
    return False


def test_commands_are_the_top_level_modules_and_only_they():
    runnable = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if runs_as_main(path))
    assert runnable == sorted(f"{verb}.py" for verb in COMMANDS)
    assert not list(PACKAGE.rglob("__main__.py"))
    for path in PACKAGE.rglob("*.py"):
        imported = {
            alias.name
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert "argparse" not in imported, f"{path}: commands take Hydra overrides, not argparse options"


@pytest.mark.parametrize("verb", COMMANDS)
def test_each_command_is_a_hydra_command_with_help_and_one_line_mistakes(verb, capsys):
    if verb == "app":
        pytest.importorskip("gradio")
    module = importlib.import_module(f"med3dvlm.{verb}")
    assert module.main.job is not None  # built by cli.hydra_command
    assert module.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"python -m med3dvlm.{verb}"), usage[:200]

    assert module.main(["no_such_key=1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"error: unknown key 'no_such_key' on the command line: `python -m med3dvlm.{verb} --cfg job` lists the keys"
        " (+no_such_key=... adds a new one)"
    ]
