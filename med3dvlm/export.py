"""Training run -> users: write a trained model as one self-contained folder.

    python -m med3dvlm.export <run>/checkpoints/last.ckpt <output dir>

The checkpoint records its run config, so the model is rebuilt from it (the hand-off folders it
was started from are not needed: the checkpoint holds every weight). The stage is detected:

* stage 2/3 (VLM): the LoRA updates are merged into the base weights and
  :meth:`Med3DVLM.save_pretrained` writes the folder that ``Med3DVLM.from_pretrained(dir)`` loads;
* stage 1 (SigLIP/CLIP): image encoder, text encoder, tokenizer and heads, plus the volume size the
  model was trained at (:func:`med3dvlm.models.contrastive.save_pretrained_contrastive`).

``med3dvlm.load_model(dir)`` loads either kind for embedding, retrieval and questions.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med3dvlm.cli import reports_mistakes

log = logging.getLogger(__name__)


VLM_STAGE_TARGET = "med3dvlm.stages.vlm.VLMStage"
CONTRASTIVE_STAGE_TARGET = "med3dvlm.stages.contrastive.ContrastiveModule"


def read_checkpoint(ckpt_path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(run config, checkpoint)`` of a checkpoint written by ``python -m med3dvlm.train``, read
    without running anything in it (:mod:`med3dvlm.checkpoint_io`)."""
    from omegaconf import OmegaConf

    from med3dvlm.checkpoint_io import load_checkpoint, stored_run_config
    from med3dvlm.resolvers import register_resolvers

    register_resolvers()
    checkpoint = load_checkpoint(ckpt_path)
    return OmegaConf.create(stored_run_config(checkpoint, ckpt_path)), checkpoint


def checkpoint_stage(cfg: Any) -> str:
    """``"vlm"`` or ``"contrastive"``: which stage's LightningModule a run config builds."""
    target = cfg.model.get("_target_")
    stages = {VLM_STAGE_TARGET: "vlm", CONTRASTIVE_STAGE_TARGET: "contrastive"}
    if target not in stages:
        raise ValueError(f"a checkpoint of {target} cannot be exported: expected a stage-1 or stage-2/3 run")
    return stages[target]


def _instantiate_from_checkpoint(cfg: Any, checkpoint: dict[str, Any]):
    import hydra
    from omegaconf import open_dict

    with open_dict(cfg):
        # every weight comes from the checkpoint: do not read (possibly moved) hand-off folders
        if "projector_path" in cfg.model:
            cfg.model.projector_path = None
        cfg.model.model.image_encoder.pretrained = None
    module = hydra.utils.instantiate(cfg.model)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module


def load_stage_checkpoint(ckpt_path: str | os.PathLike):
    """The ``VLMStage`` of a stage-2/3 checkpoint written by ``python -m med3dvlm.train``, weights loaded."""
    cfg, checkpoint = read_checkpoint(ckpt_path)
    if cfg.model.get("_target_") != VLM_STAGE_TARGET:
        raise ValueError(f"{ckpt_path} is a {cfg.model.get('_target_')} checkpoint, not a stage-2/3 (VLM) one")
    return _instantiate_from_checkpoint(cfg, checkpoint)


def load_checkpoint_model(ckpt_path: str | os.PathLike):
    """The trained model of any stage's checkpoint, read once: ``(VLMStage, preprocessing)`` for
    stages 2-3, ``(ContrastiveCheckpoint, preprocessing)`` for stage 1; ``preprocessing`` is what
    the training data had (:func:`training_preprocessing`)."""
    cfg, checkpoint = read_checkpoint(ckpt_path)
    if checkpoint_stage(cfg) == "vlm":
        return _instantiate_from_checkpoint(cfg, checkpoint), training_preprocessing(cfg)
    return _contrastive_from_checkpoint(cfg, checkpoint), training_preprocessing(cfg)


def training_preprocessing(cfg: Any):
    """The :class:`~med3dvlm.data.preprocessing.Preprocessing` a run's data had (``data.preprocessing``,
    recorded by ``train`` from the data root), else the data root's record if it is still there, else None."""
    from omegaconf import OmegaConf

    from med3dvlm.data.preprocessing import Preprocessing, read_preprocessing

    record = cfg.data.get("preprocessing")
    if record is not None:
        return Preprocessing.from_dict(OmegaConf.to_container(record, resolve=True), where="the run config")
    root = cfg.data.datamodule.get("root")
    return read_preprocessing(root) if root and Path(root).is_dir() else None


def training_image_size(cfg: Any) -> list[int] | None:
    """(D, H, W) of the volumes a run trained on: the resize target, else the phantom shape."""
    data = cfg.data
    for size in (data.datamodule.get("spatial_size"), data.get("image_size"), (data.get("phantom") or {}).get("shape")):
        if size is not None:
            return [int(n) for n in size]
    return None


@dataclass
class ContrastiveCheckpoint:
    """What a stage-1 checkpoint rebuilds into: the model and how it reads its inputs."""

    model: Any  # ContrastiveModel, eval mode
    tokenizer: Any
    image_size: list[int] | None
    max_text_tokens: int


def load_contrastive_checkpoint(ckpt_path: str | os.PathLike) -> ContrastiveCheckpoint:
    """The stage-1 ``ContrastiveModel`` of a SigLIP/CLIP checkpoint with its tokenizer and input size."""
    cfg, checkpoint = read_checkpoint(ckpt_path)
    if cfg.model.get("_target_") != CONTRASTIVE_STAGE_TARGET:
        raise ValueError(f"{ckpt_path} is a {cfg.model.get('_target_')} checkpoint, not a stage-1 one")
    return _contrastive_from_checkpoint(cfg, checkpoint)


def _contrastive_from_checkpoint(cfg: Any, checkpoint: dict[str, Any]) -> ContrastiveCheckpoint:
    from med3dvlm.models.text_encoder import load_tokenizer
    from med3dvlm.stages.contrastive import MAX_REPORT_TOKENS

    module = _instantiate_from_checkpoint(cfg, checkpoint)
    collator = cfg.get("collator") or {}
    tokenizer_path = collator.get("tokenizer_path") or cfg.text_encoder.name_or_path
    max_tokens = collator.get("max_length") or cfg.text_encoder.get("max_length") or MAX_REPORT_TOKENS
    return ContrastiveCheckpoint(
        model=module.model.eval(),
        tokenizer=load_tokenizer(tokenizer_path),
        image_size=training_image_size(cfg),
        max_text_tokens=int(max_tokens),
    )


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


@reports_mistakes("med3dvlm.export")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m med3dvlm.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a stage-1, -2 or -3 checkpoint, e.g. <run>/checkpoints/last.ckpt")
    parser.add_argument("output_dir", help="folder to write (config, safetensors, tokenizer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    stage, path = export_checkpoint(args.checkpoint, args.output_dir)
    if stage == "vlm":
        print(f"Med3DVLM written to {path}; load it with med3dvlm.Med3DVLM.from_pretrained({str(path)!r})")
    else:
        print(f"stage-1 (retrieval) model written to {path}")
    print(f"use it with med3dvlm.load_model({str(path)!r}) or python -m med3dvlm.demo model_dir={path} image=...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
