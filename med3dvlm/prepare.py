"""Data preparation entry point (SPEC §6), options in ``configs/prepare.yaml``.

    python -m med3dvlm.prepare raw_dir=RAW out_dir=OUT [vqa_dir=M3D_VQA] [key=value ...]
    python -m med3dvlm.prepare convert=ROOT        # add fast .nii copies to a prepared dataset

Exit status: 0 when every case was prepared or already done, 1 when a case failed (the others
still ran; the summary names each failure and why), 2 when the command could not start.
"""

from __future__ import annotations

from omegaconf import DictConfig

from med3dvlm.cli import hydra_command
from med3dvlm.resolvers import register_resolvers

register_resolvers()


@hydra_command("med3dvlm.prepare", "prepare")  # a PreparationError (cannot start): one line, status 2
def main(cfg: DictConfig) -> None:
    from med3dvlm.data.prepare import run_from_config

    summary = run_from_config(cfg)
    if summary.exit_code:
        raise SystemExit(summary.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
