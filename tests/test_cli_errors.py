"""``python -m med3dvlm.train | eval | prepare | export``: a user's mistake (a missing or empty file, an
unknown key, a missing value, an unreadable checkpoint) prints one ``error:`` line that names the file
or key and exits with status 2, without a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from med3dvlm.cli import describe_mistake, one_line


def run_command(*arguments: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", *arguments], check=False, capture_output=True, text=True, timeout=300, env=env
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, result.stderr[-3000:]
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


def cases(tmp_path):
    """``{name: (command line, what the error line names)}``; files are made under ``tmp_path``."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    run = f"hydra.run.dir={tmp_path / 'run'}"
    missing = tmp_path / "absent"
    return {
        "train unknown key": (
            ["med3dvlm.train", "experiment=siglip", "trainer.max_epoch=3", run],
            ["'trainer.max_epoch'"],
        ),
        "train unknown config": (["med3dvlm.train", "experiment=sigclip", run], ["experiment/sigclip", "siglip_paper"]),
        "train bad value": (["med3dvlm.train", "trainer.max_epochs=[", run], ["trainer.max_epochs=["]),
        "train missing checkpoint": (
            ["med3dvlm.train", "experiment=siglip", f"ckpt_path={missing}.ckpt", run],
            [f"{missing}.ckpt"],
        ),
        "eval missing key": (["med3dvlm.eval", "eval=retrieval", run], ["ckpt_path"]),
        "eval empty predictions": (["med3dvlm.eval", "eval=score", f"predictions={empty}", run], [str(empty)]),
        "eval missing predictions": (
            ["med3dvlm.eval", "eval=score", f"predictions={missing}.jsonl", run],
            [str(missing)],
        ),
        "prepare missing raw": (
            ["med3dvlm.prepare", f"raw_dir={missing}", f"out_dir={tmp_path / 'out'}", run],
            [str(missing)],
        ),
        "prepare unknown key": (["med3dvlm.prepare", "raw_dri=x", run], ["'raw_dri'"]),
        "export missing checkpoint": (
            ["med3dvlm.export", f"ckpt_path={missing}.ckpt", f"out_dir={tmp_path / 'out'}"],
            [str(missing)],
        ),
        "export unreadable checkpoint": (
            ["med3dvlm.export", f"ckpt_path={garbage}", f"out_dir={tmp_path / 'out'}"],
            [str(garbage)],
        ),
    }


# the keys of cases(); unreadable and unsafe checkpoints in eval and the demo: test_checkpoint_safety.py
CASES = [
    "train unknown key", "train unknown config", "train bad value", "train missing checkpoint",
    "eval missing key", "eval empty predictions", "eval missing predictions",
    "prepare missing raw", "prepare unknown key", "export missing checkpoint", "export unreadable checkpoint",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_and_status_2(case, tmp_path):
    assert sorted(cases(tmp_path)) == sorted(CASES)
    arguments, names = cases(tmp_path)[case]
    assert_one_line_error(run_command(*arguments), *names)


@pytest.mark.parametrize("case", ["train unknown key", "eval empty predictions", "export unreadable checkpoint"])
def test_hydra_full_error_shows_the_traceback(case, tmp_path):
    arguments, _ = cases(tmp_path)[case]
    result = run_command(*arguments, full_error=True)
    assert result.returncode != 0 and "Traceback" in result.stderr, result.stderr[-3000:]


def test_messages_become_one_line():
    hydra_style = (
        "In 'train': Could not find 'experiment/x'\n\nAvailable options in 'experiment':\n\tpretrain\n\tsiglip\n"
    )
    assert (
        one_line(hydra_style)
        == "In 'train': Could not find 'experiment/x'; Available options in 'experiment': pretrain, siglip"
    )
    omegaconf_style = "Missing mandatory value: ckpt_path\n    full_key: ckpt_path\n    object_type=dict"
    assert one_line(omegaconf_style) == "Missing mandatory value: ckpt_path"
    assert describe_mistake(FileNotFoundError("checkpoint x.ckpt does not exist")) == "checkpoint x.ckpt does not exist"
