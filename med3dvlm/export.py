"""Training run -> users: ``python -m med3dvlm.export ckpt_path=<run>/checkpoints/last.ckpt out_dir=DIR``.

Writes the trained model of a stage-1, -2 or -3 checkpoint as one self-contained folder (the work
is in :mod:`med3dvlm.checkpoints.export`): a VLM with its LoRA merged, or a stage-1 model with both
towers; ``med3dvlm.load_model(DIR)`` loads either. The keys are those of ``configs/export.yaml``.
"""

from __future__ import annotations

from typing import Any

from med3dvlm.cli import hydra_command

PROGRAM = "med3dvlm.export"


@hydra_command(PROGRAM, "export")  # a missing, unsafe or foreign checkpoint: one line, status 2
def main(cfg: Any) -> None:
    from med3dvlm.checkpoints.export import export_checkpoint

    stage, path = export_checkpoint(str(cfg.ckpt_path), str(cfg.out_dir))
    if stage == "vlm":
        print(f"Med3DVLM written to {path}; load it with med3dvlm.Med3DVLM.from_pretrained({str(path)!r})")
    else:
        print(f"stage-1 (retrieval) model written to {path}")
    print(f"use it with med3dvlm.load_model({str(path)!r}) or python -m med3dvlm.demo model_dir={path} image=...")


if __name__ == "__main__":
    raise SystemExit(main())
