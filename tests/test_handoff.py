"""The one stage-to-stage hand-off callback: it writes the part it is told to, from the best
checkpoint's weights (not the last step's), in the folder format the next stage loads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from med3dvlm.checkpoints.handoff import ExportHandOff
from med3dvlm.models.encoders import build_encoder, load_pretrained_encoder


class FakeModule(nn.Module):
    """Stands in for a stage's LightningModule: a ``model`` with an image encoder, and ``print``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.image_encoder = build_encoder("vit3d", image_size=(32, 32, 32), depth=1)
        self.printed: list[str] = []

    def print(self, message: str) -> None:
        self.printed.append(message)


def trainer_with_best(best_model_path: str, is_global_zero: bool = True):
    checkpoint_callback = SimpleNamespace(best_model_path=best_model_path)
    return SimpleNamespace(is_global_zero=is_global_zero, checkpoint_callback=checkpoint_callback)


def test_image_encoder_hand_off_writes_the_best_checkpoints_weights(tmp_path):
    module = FakeModule()
    best = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}  # "the best epoch"
    torch.save({"state_dict": best}, tmp_path / "best.ckpt")

    ExportHandOff("image_encoder", str(tmp_path / "image_encoder")).on_fit_end(
        trainer_with_best(str(tmp_path / "best.ckpt")), module
    )

    loaded = load_pretrained_encoder(tmp_path / "image_encoder")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, best[f"model.image_encoder.{name}"])
    folder = tmp_path / "image_encoder"
    assert module.printed == [f"image encoder saved to {folder} (load with encoder.pretrained={folder})"]
    assert not [p for p in (tmp_path / "image_encoder").iterdir() if p.name.startswith(".")]  # no temporary left


def test_without_a_best_checkpoint_the_current_weights_are_written_and_only_by_rank_zero(tmp_path):
    module = FakeModule()
    ExportHandOff("image_encoder", str(tmp_path / "other_rank")).on_fit_end(trainer_with_best("", False), module)
    assert not (tmp_path / "other_rank").exists()

    ExportHandOff("image_encoder", str(tmp_path / "out")).on_fit_end(trainer_with_best(""), module)
    loaded = load_pretrained_encoder(tmp_path / "out")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, module.model.image_encoder.state_dict()[name])


def test_an_unknown_part_is_refused_naming_the_parts():
    with pytest.raises(ValueError, match="image_encoder, projector"):
        ExportHandOff("text_encoder", "out")
