"""The hand-off between stages: at the end of fit, a trained part is written where the next stage
loads it, from the best checkpoint when there is one (the model that validated best).

* ``part=image_encoder``: ``encoder.json`` + ``model.safetensors``
  (:func:`med3dvlm.models.encoders.save_pretrained_encoder`), loaded with ``encoder.pretrained=DIR``;
* ``part=projector``: ``projector.json`` + ``model.safetensors``
  (:func:`med3dvlm.models.vlm.save_pretrained_projector`), loaded with ``model.projector_path=DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from med3dvlm.checkpoints.reading import load_checkpoint


def best_checkpoint_state(trainer: L.Trainer, prefix: str) -> dict[str, torch.Tensor] | None:
    """The weights under ``prefix`` (prefix removed) in the best checkpoint so far; None without one."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best or not os.path.exists(best):
        return None
    checkpoint = load_checkpoint(best)  # weights_only: nothing in the file runs
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def _save_image_encoder(model: Any, output_dir: str, state: dict | None) -> Path:
    from med3dvlm.models.encoders import save_pretrained_encoder

    return save_pretrained_encoder(model.image_encoder, output_dir, state_dict=state)


def _save_projector(model: Any, output_dir: str, state: dict | None) -> Path:
    from med3dvlm.models.vlm import save_pretrained_projector

    return save_pretrained_projector(model, output_dir, state_dict=state)


@dataclass(frozen=True)
class HandOffPart:
    """One part a stage hands on: its weights' prefix in the stage's state dict, its writer (given
    the stage's ``model``), and the config key the next stage loads it with."""

    title: str
    prefix: str
    save: Callable[[Any, str, dict | None], Path]
    loaded_with: str


HAND_OFF_PARTS = {
    "image_encoder": HandOffPart("image encoder", "model.image_encoder.", _save_image_encoder, "encoder.pretrained"),
    "projector": HandOffPart("projector", "model.projector.", _save_projector, "model.projector_path"),
}


class ExportHandOff(Callback):
    """Writes ``part`` (``image_encoder`` or ``projector``) of the trained model to ``output_dir`` at
    the end of fit; ``from_best``: the weights of the best checkpoint when one exists."""

    def __init__(self, part: str, output_dir: str, from_best: bool = True) -> None:
        if part not in HAND_OFF_PARTS:
            raise ValueError(f"part must be one of {', '.join(HAND_OFF_PARTS)}, got {part!r}")
        self.part = HAND_OFF_PARTS[part]
        self.output_dir = output_dir
        self.from_best = from_best

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # one writer (and reader) under data parallelism
            return
        state = best_checkpoint_state(trainer, self.part.prefix) if self.from_best else None
        path = self.part.save(pl_module.model, self.output_dir, state)
        pl_module.print(f"{self.part.title} saved to {path} (load with {self.part.loaded_with}={path})")
