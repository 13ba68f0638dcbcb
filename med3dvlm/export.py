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

log = logging.getLogger(__name__)


VLM_STAGE_TARGET = "med3dvlm.stages.vlm.VLMStage"
CONTRASTIVE_STAGE_TARGET = "med3dvlm.stages.contrastive.ContrastiveModule"


def read_checkpoint(ckpt_path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(run config, checkpoint)`` of a checkpoint written by ``python -m med3dvlm.train``."""
    import torch
    from omegaconf import OmegaConf

    from med3dvlm.resolvers import register_resolvers
    from med3dvlm.train import CONFIG_CHECKPOINT_KEY

    register_resolvers()
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - whatever the unpickler says, the file is no checkpoint
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or CONFIG_CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path} holds no med3dvlm run config: was it written by `python -m med3dvlm.train`?")
    return OmegaConf.create(checkpoint[CONFIG_CHECKPOINT_KEY]), checkpoint


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
    """The trained model of any stage's checkpoint, read once: a ``VLMStage`` (stages 2-3) or a
    :class:`ContrastiveCheckpoint` (stage 1)."""
    cfg, checkpoint = read_checkpoint(ckpt_path)
    if checkpoint_stage(cfg) == "vlm":
        return _instantiate_from_checkpoint(cfg, checkpoint)
    return _contrastive_from_checkpoint(cfg, checkpoint)


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


def _save(loaded: Any, output_dir: str | os.PathLike) -> Path:
    """Writes a loaded checkpoint model (``VLMStage`` or :class:`ContrastiveCheckpoint`) as a folder."""
    from med3dvlm.models.contrastive import save_pretrained_contrastive

    if isinstance(loaded, ContrastiveCheckpoint):
        return save_pretrained_contrastive(
            loaded.model, output_dir, loaded.tokenizer, loaded.image_size, max_text_tokens=loaded.max_text_tokens
        )
    loaded.model.eval()
    return loaded.model.save_pretrained(output_dir)  # merges LoRA first


def export_vlm(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Merges LoRA and writes the VLM of ``ckpt_path`` to ``output_dir``; returns the folder."""
    path = _save(load_stage_checkpoint(ckpt_path), output_dir)
    log.info("exported %s to %s", ckpt_path, path)
    return path


def export_contrastive(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Writes the stage-1 model of ``ckpt_path`` (both towers, heads, tokenizer) to ``output_dir``."""
    path = _save(load_contrastive_checkpoint(ckpt_path), output_dir)
    log.info("exported %s to %s", ckpt_path, path)
    return path


def export_checkpoint(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> tuple[str, Path]:
    """Exports a stage-1 or stage-2/3 checkpoint, whichever it is; returns ``(stage, folder)``."""
    loaded = load_checkpoint_model(ckpt_path)
    stage = "contrastive" if isinstance(loaded, ContrastiveCheckpoint) else "vlm"
    path = _save(loaded, output_dir)
    log.info("exported %s (%s) to %s", ckpt_path, stage, path)
    return stage, path


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
