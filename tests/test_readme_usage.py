"""The README's "Using a trained model" examples run as written, so they cannot rot.

Its Python blocks and its ``python -m med3dvlm.demo`` commands run in a folder that holds what the
text assumes (``exports/vlm``, ``exports/siglip``, ``scan.nii.gz``, ``other.nii.gz``), here tiny
random models and phantom volumes. Only the decoding length is cut (``DEFAULT_MAX_NEW_TOKENS``), for time.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using a trained model"


def section_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def demo_commands() -> list[list[str]]:
    commands = []
    for block in section_blocks("bash"):
        for line in block.splitlines():
            if line.startswith("python -m med3dvlm.demo "):
                commands.append(shlex.split(line, comments=True)[3:])
    return commands


@pytest.fixture
def readme_folder(tiny_models, tmp_path, monkeypatch):
    import med3dvlm.api

    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "vlm").symlink_to(tiny_models.vlm_dir)
    (tmp_path / "exports" / "siglip").symlink_to(tiny_models.clip_dir)
    shutil.copy(tiny_models.volumes[0], tmp_path / "scan.nii.gz")
    shutil.copy(tiny_models.volumes[1], tmp_path / "other.nii.gz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(med3dvlm.api, "DEFAULT_MAX_NEW_TOKENS", 16)
    return tmp_path


def test_the_python_example_runs(readme_folder, capsys):
    blocks = section_blocks("python")
    assert blocks and "load_model" in blocks[0]
    for block in blocks:
        exec(compile(block, f"{README}:{SECTION}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "Match(index=" in out


def test_the_demo_commands_run(readme_folder, capsys):
    from med3dvlm.demo import main

    commands = demo_commands()
    assert len(commands) == 3
    outputs = []
    for arguments in commands:
        assert main(arguments) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("question: Which organ has a lesion?\nanswer: ")
    assert outputs[1].startswith("report: ")
    assert outputs[2].startswith("image -> text retrieval, top 1 of 2 texts")
