"""Stage 3 -> users: merge LoRA into the LLM and write the whole VLM as one folder.

    python -m med3dvlm.export <finetune run>/checkpoints/last.ckpt <output dir>

The checkpoint records its run config, so the model is rebuilt from it (the hand-off folders it
was started from are not needed: the checkpoint holds every weight), the LoRA updates are merged
into the base weights and :meth:`Med3DVLM.save_pretrained` writes the folder that
``med3dvlm.Med3DVLM.from_pretrained(dir)`` loads.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


def load_stage_checkpoint(ckpt_path: str | os.PathLike):
    """The ``VLMStage`` of a stage-2/3 checkpoint written by ``python -m med3dvlm.train``, weights loaded."""
    import hydra
    import torch
    from omegaconf import OmegaConf, open_dict

    from med3dvlm.resolvers import register_resolvers
    from med3dvlm.train import CONFIG_CHECKPOINT_KEY

    register_resolvers()
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if CONFIG_CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path} holds no med3dvlm run config: was it written by `python -m med3dvlm.train`?")
    cfg = OmegaConf.create(checkpoint[CONFIG_CHECKPOINT_KEY])
    if cfg.model.get("_target_") != "med3dvlm.stages.vlm.VLMStage":
        raise ValueError(f"{path} is a {cfg.model.get('_target_')} checkpoint, not a stage-2/3 (VLM) one")
    with open_dict(cfg):
        # every weight comes from the checkpoint: do not read (possibly moved) hand-off folders
        cfg.model.projector_path = None
        cfg.model.model.image_encoder.pretrained = None
    module = hydra.utils.instantiate(cfg.model)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module


def export_vlm(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Merges LoRA and writes the VLM of ``ckpt_path`` to ``output_dir``; returns the folder."""
    module = load_stage_checkpoint(ckpt_path)
    module.model.eval()
    path = module.model.save_pretrained(output_dir)
    log.info("exported %s to %s", ckpt_path, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m med3dvlm.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a stage-3 (or stage-2) checkpoint, e.g. <run>/checkpoints/last.ckpt")
    parser.add_argument("output_dir", help="folder to write (config, safetensors, tokenizer)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    path = export_vlm(args.checkpoint, args.output_dir)
    print(f"Med3DVLM written to {path}; load it with med3dvlm.Med3DVLM.from_pretrained({str(path)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
