"""Batch inference entry point: ``python -m med3dvlm.predict model_dir=... inputs=... out=preds.jsonl``.

Runs a trained, exported or released model over a folder or list of scans (``configs/predict.yaml``;
the work is in :mod:`med3dvlm.predicting`). Exit status: 0 when every input gave its rows, 1 when
some failed (listed in the summary) or ``on_bad_input=error`` stopped the run, 2 for a mistake on
the command line or a refused resume (one line, no traceback).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from med3dvlm.cli import hydra_command
from med3dvlm.resolvers import register_resolvers

PROGRAM = "med3dvlm.predict"
FAILED_INPUTS_EXIT_CODE = 1

register_resolvers()


@hydra_command(PROGRAM, "predict")
def main(cfg: DictConfig) -> None:
    from med3dvlm.predicting.module import BadInputStop
    from med3dvlm.predicting.run import run_predict

    try:
        summary = run_predict(cfg)
    except BadInputStop as stop:
        print(f"error: {stop}", file=sys.stderr)
        raise SystemExit(FAILED_INPUTS_EXIT_CODE) from None
    if summary is None:  # a rank other than 0: rank 0 reports
        return
    print(summary.text())
    if summary.bad:
        raise SystemExit(FAILED_INPUTS_EXIT_CODE)  # Hydra passes a SystemExit through


if __name__ == "__main__":
    raise SystemExit(main())
