"""Evaluation entry point: ``python -m med3dvlm.eval eval=<suite> [ckpt_path=... | model_dir=...]``.

The suites (retrieval, caption, vqa_closed, vqa_open, all, score, zero_shot) and their keys are in
``configs/eval.yaml`` and ``configs/eval/``; the work is in :mod:`med3dvlm.evaluation.evaluator`.
"""

from __future__ import annotations

from typing import Any

from med3dvlm.cli import hydra_command
from med3dvlm.resolvers import register_resolvers

PROGRAM = "med3dvlm.eval"

register_resolvers()


@hydra_command(PROGRAM, "eval")  # a missing checkpoint or data root, a bad suite: one line, status 2
def main(cfg: Any) -> None:
    from med3dvlm.evaluation.evaluator import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
