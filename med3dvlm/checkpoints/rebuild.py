"""A trained model rebuilt from a checkpoint alone: its run config builds the stage, its state dict
fills every weight (the hand-off folders the run started from are not needed), and the run config
tells how the training data was read (volume size, preprocessing)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med3dvlm.checkpoints.reading import (
    CONTRASTIVE_STAGE_TARGET,
    VLM_STAGE_TARGET,
    checkpoint_stage,
    read_checkpoint,
)


def rebuild_stage(cfg: Any, checkpoint: dict[str, Any]):
    """The stage's LightningModule that ``cfg`` (a run config read by :func:`read_checkpoint`)
    builds, with the checkpoint's weights (strict). ``cfg`` is changed: it no longer names the
    hand-off folders (``model.projector_path``, ``encoder.pretrained``), which may have moved."""
    import hydra
    from omegaconf import open_dict

    with open_dict(cfg):
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
    return rebuild_stage(cfg, checkpoint)


def load_checkpoint_model(ckpt_path: str | os.PathLike):
    """The trained model of any stage's checkpoint, read once: ``(VLMStage, preprocessing)`` for
    stages 2-3, ``(ContrastiveCheckpoint, preprocessing)`` for stage 1; ``preprocessing`` is what
    the training data had (:func:`training_preprocessing`)."""
    cfg, checkpoint = read_checkpoint(ckpt_path)
    if checkpoint_stage(cfg) == "vlm":
        return rebuild_stage(cfg, checkpoint), training_preprocessing(cfg)
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

    module = rebuild_stage(cfg, checkpoint)
    collator = cfg.get("collator") or {}
    tokenizer_path = collator.get("tokenizer_path") or cfg.text_encoder.name_or_path
    max_tokens = collator.get("max_length") or cfg.text_encoder.get("max_length") or MAX_REPORT_TOKENS
    return ContrastiveCheckpoint(
        model=module.model.eval(),
        tokenizer=load_tokenizer(tokenizer_path),
        image_size=training_image_size(cfg),
        max_text_tokens=int(max_tokens),
    )
