"""Callbacks the training configs use: exact resume and the hand-off to the next stage."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RngStateCheckpoint(Callback):
    """Stores the Python, NumPy and torch random states in every checkpoint and restores them.

    Lightning does not, so without this a resumed run draws different dropout masks than an
    uninterrupted one and ends with different weights.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            # as a tensor + plain values: checkpoints stay loadable with torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if state_dict.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def best_checkpoint_state(trainer: L.Trainer, prefix: str) -> dict[str, torch.Tensor] | None:
    """The weights under ``prefix`` (prefix removed) in the best checkpoint so far; None without one."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best or not os.path.exists(best):
        return None
    from med3dvlm.checkpoint_io import load_checkpoint

    checkpoint = load_checkpoint(best)  # weights_only: nothing in the file runs
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


class ExportImageEncoder(Callback):
    """Writes the trained image encoder where the next stage loads it (``encoder.pretrained``).

    Layout: ``<output_dir>/encoder.json`` (how to build it) and ``model.safetensors`` (its weights),
    see :func:`med3dvlm.models.encoders.load_pretrained_encoder`. Written at the end of fit, from
    the best checkpoint when one exists, so the hand-off is the model that validated best.
    """

    def __init__(self, output_dir: str, from_best: bool = True) -> None:
        self.output_dir = output_dir
        self.from_best = from_best

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from med3dvlm.models.encoders import save_pretrained_encoder

        if not trainer.is_global_zero:  # one writer (and reader) under data parallelism
            return
        encoder = pl_module.model.image_encoder
        state = best_checkpoint_state(trainer, "model.image_encoder.") if self.from_best else None
        path = save_pretrained_encoder(encoder, self.output_dir, state_dict=state)
        pl_module.print(f"image encoder saved to {path} (load with encoder.pretrained={path})")


def write_json(path: str | Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
