"""A run killed mid-epoch and resumed ends with the same weights; a kill during a checkpoint write
leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config
from lightning.pytorch.callbacks import Callback

from med3dvlm.train import train

pytestmark = pytest.mark.slow  # runs killed and resumed in subprocesses: make test-slow

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class SimulatedKill(Exception):
    pass


class KillAfterStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedKill(f"killed after step {self.step}")


def resume_config(tmp_path: Path, run: str, *extra: str):
    overrides = [
        "experiment=siglip",
        "debug=tiny",
        *CPU_TINY,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=0",
        "test=false",
        "callbacks.model_checkpoint.monitor=null",
        # the embedding cache fills in batch order, so float rounding would differ after a resume
        "text_encoder.module.cache_embeddings=false",
        "+callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.encoder_export=null",
        *extra,
    ]
    cfg = compose_config("train", overrides, tmp_path / run)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")  # both runs share one phantom set
        cfg.data.datamodule.root = str(tmp_path / "data" / "phantoms")
    return cfg


def final_weights(cfg) -> dict[str, torch.Tensor]:
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    reference = resume_config(tmp_path, "reference")
    train(reference)
    expected = final_weights(reference)

    interrupted = resume_config(tmp_path, "interrupted")
    steps_per_epoch = 4  # 16 training phantoms / batch 4
    kill_step = steps_per_epoch + 2  # mid-way through the second epoch
    with pytest.raises(SimulatedKill):
        train(interrupted, extra_callbacks=[KillAfterStep(kill_step)])
    checkpoint = torch.load(Path(interrupted.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == kill_step - 1  # the kill came before step 6 was saved

    resumed = resume_config(tmp_path, "interrupted", "ckpt_path=last")
    train(resumed)
    actual = final_weights(resumed)
    assert expected.keys() == actual.keys()
    mismatched = [k for k in expected if not torch.allclose(expected[k], actual[k], rtol=0, atol=1e-6)]
    assert not mismatched, mismatched[:5]
    # and the resumed run did train: weights differ from the checkpoint it resumed from
    assert any(not torch.equal(checkpoint["state_dict"][k], actual[k]) for k in actual)


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from fsspec.implementations.local import LocalFileOpener
    from lightning.pytorch import Trainer
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    checkpoint_io = trainer.strategy.checkpoint_io  # what ModelCheckpoint's last.ckpt goes through
    path = sys.argv[1]
    checkpoint_io.save_checkpoint({"weights": torch.zeros(100_000)}, path)
    write = LocalFileOpener.write
    def write_half_then_die(self, data):
        write(self, data[: len(data) // 2]); self.flush(); os.kill(os.getpid(), signal.SIGKILL)
    LocalFileOpener.write = write_half_then_die
    checkpoint_io.save_checkpoint({"weights": torch.ones(100_000)}, path)
    """
)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], capture_output=True, timeout=300)
    assert result.returncode == -9  # SIGKILL in the middle of the second write
    restored = torch.load(path, weights_only=True)
    assert torch.equal(restored["weights"], torch.zeros(100_000))
