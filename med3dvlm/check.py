"""Dataset and raw-CT checks: ``python -m med3dvlm.check root=DIR`` or ``ct=PATH [series=UID]``.

Lists every problem of a prepared dataset (M3D, CT-RATE, 3D-RAD layouts) or of raw CT before it is
prepared (the work is in :mod:`med3dvlm.data.check`; keys in ``configs/check.yaml``). Exit status 1
when there is any problem, 2 for a mistake on the command line.
"""

from __future__ import annotations

from typing import Any

from med3dvlm.cli import hydra_command
from med3dvlm.resolvers import register_resolvers

PROGRAM = "med3dvlm.check"

register_resolvers()


@hydra_command(PROGRAM, "check")
def main(cfg: Any) -> None:
    from med3dvlm.data.check import run_from_config

    report = run_from_config(cfg)
    if report.exit_code:
        raise SystemExit(report.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
