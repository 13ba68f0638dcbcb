"""Training run -> users: a trained model written as one self-contained folder
(``python -m med3dvlm.export ckpt_path=<run>/checkpoints/last.ckpt out_dir=<folder>``).

The checkpoint records its run config, so the model is rebuilt from it (the hand-off folders it
was started from are not needed: the checkpoint holds every weight; :mod:`med3dvlm.checkpoints`
reads and rebuilds it). The stage is detected:

* stage 2/3 (VLM): the LoRA updates are merged into the base weights and
  :meth:`Med3DVLM.save_pretrained` writes the folder that ``Med3DVLM.from_pretrained(dir)`` loads;
* stage 1 (SigLIP/CLIP): image encoder, text encoder, tokenizer and heads, plus the volume size the
  model was trained at (:func:`med3dvlm.models.contrastive.save_pretrained_contrastive`).

``med3dvlm.load_model(dir)`` loads either kind for embedding, retrieval and questions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from med3dvlm.checkpoints.rebuild import ContrastiveCheckpoint, load_checkpoint_model

log = logging.getLogger(__name__)


def _save(loaded: Any, output_dir: str | os.PathLike, preprocessing: Any) -> Path:
    """Writes a loaded checkpoint model (``VLMStage`` or :class:`ContrastiveCheckpoint`) as a folder,
    with ``preprocessing.json`` when the training data recorded its preprocessing."""
    from med3dvlm.data.preprocessing import PREPROCESSING_FILE, write_preprocessing
    from med3dvlm.models.contrastive import save_pretrained_contrastive

    if isinstance(loaded, ContrastiveCheckpoint):
        path = save_pretrained_contrastive(
            loaded.model, output_dir, loaded.tokenizer, loaded.image_size, max_text_tokens=loaded.max_text_tokens
        )
    else:
        loaded.model.eval()
        path = loaded.model.save_pretrained(output_dir)  # merges LoRA first
    if preprocessing is not None:
        write_preprocessing(path, preprocessing)
    else:
        (Path(path) / PREPROCESSING_FILE).unlink(missing_ok=True)  # never a stale record of an earlier export
        log.warning("%s: the training data recorded no preprocessing; the export reads prepared volumes only", path)
    return path


def _export(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike, stage: str | None) -> tuple[str, Path]:
    loaded, preprocessing = load_checkpoint_model(ckpt_path)
    found = "contrastive" if isinstance(loaded, ContrastiveCheckpoint) else "vlm"
    if stage is not None and found != stage:
        raise ValueError(f"{ckpt_path} is a {found} checkpoint, not a {stage} one")
    path = _save(loaded, output_dir, preprocessing)
    log.info("exported %s (%s) to %s", ckpt_path, found, path)
    return found, path


def export_vlm(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Merges LoRA and writes the VLM of ``ckpt_path`` to ``output_dir``; returns the folder."""
    return _export(ckpt_path, output_dir, "vlm")[1]


def export_contrastive(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Writes the stage-1 model of ``ckpt_path`` (both towers, heads, tokenizer) to ``output_dir``."""
    return _export(ckpt_path, output_dir, "contrastive")[1]


def export_checkpoint(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> tuple[str, Path]:
    """Exports a stage-1 or stage-2/3 checkpoint, whichever it is; returns ``(stage, folder)``."""
    return _export(ckpt_path, output_dir, None)
