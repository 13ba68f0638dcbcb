"""No checkpoint runs code when loaded: a pickle whose ``__reduce__`` calls a function, or a stored run
config that names one as ``_target_``, is refused with an error naming the file by every entry point
(API, export, eval, demo, the best-checkpoint callback, resume) and the marker file it would write
never appears; the project's own checkpoints still load (here and in test_resume, test_train_siglip,
test_vlm_stages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config
from omegaconf import open_dict

import med3dvlm
from med3dvlm.checkpoints import (
    CONFIG_CHECKPOINT_KEY,
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    stored_run_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class WritesMarker:
    """Unpickled without weights_only, this runs ``exec`` and writes ``path``: what an attacker's file does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('code ran')",)


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a checkpoint-shaped file with a code-running object inside."""
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / "malicious" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {}, CONFIG_CHECKPOINT_KEY: {"model": {}}, "payload": WritesMarker(marker)}, path)
    return path, marker


def test_the_reader_refuses_a_code_running_pickle(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError, match=f"{path} was not loaded: it asks to run exec"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_model_refuses_it(malicious):
    path, marker = malicious
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        med3dvlm.load_model(path)
    assert not marker.exists()


def test_the_best_checkpoint_callback_refuses_it(malicious):
    from med3dvlm.checkpoints.handoff import best_checkpoint_state

    path, marker = malicious
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path=str(path)))
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        best_checkpoint_state(trainer, "model.image_encoder.")
    assert not marker.exists()


def test_resuming_from_it_is_refused(malicious, tmp_path):
    from med3dvlm.train import train

    path, marker = malicious
    cfg = compose_config("train", ["experiment=siglip", "debug=tiny", *CPU_TINY, f"ckpt_path={path}"], tmp_path)
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        train(cfg)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    ["builtins.exec", "med3dvlm.train.os.system", "posix.system", "lightning.pytorch.cli.instantiate_class"],
)
def test_a_run_config_that_would_build_something_else_is_refused(target, tiny_models, tmp_path):
    """A plain-data checkpoint can still run code through its config: loading instantiates ``_target_``."""
    marker = tmp_path / "code_ran.txt"
    checkpoint = load_checkpoint(tiny_models.clip_checkpoint)
    config = checkpoint[CONFIG_CHECKPOINT_KEY]
    config["model"]["model"]["image_encoder"] = {"_target_": target, "_args_": [f"touch {marker}"]}
    path = tmp_path / "config_attack.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(
        UnsafeCheckpointError, match=f"{path} was not loaded: .* {target!r} .*model.model.image_encoder"
    ):
        med3dvlm.load_model(path)
    assert not marker.exists()


def test_the_projects_own_checkpoints_pass(tiny_models, tmp_path):
    checkpoint = load_checkpoint(tiny_models.clip_checkpoint)  # what test_api's load_model checks use
    assert stored_run_config(checkpoint, tiny_models.clip_checkpoint)["model"]["_target_"].startswith("med3dvlm.")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(garbage)):
        load_checkpoint(garbage)


def run_command(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", *arguments], check=False, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("command", ["export", "eval", "demo"])
def test_every_command_refuses_it_with_one_line(command, malicious, tiny_models, tmp_path):
    path, marker = malicious
    arguments = {
        "export": ["med3dvlm.export", f"ckpt_path={path}", f"out_dir={tmp_path / 'out'}"],
        "eval": ["med3dvlm.eval", "eval=retrieval", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"],
        "demo": ["med3dvlm.demo", f"model_dir={path}", f"image={tiny_models.volumes[0]}"],
    }[command]
    result = run_command(*arguments)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and f"{path} was not loaded" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
