"""The embedded phantom dataset: ``python -m med3dvlm.phantoms root=DIR [num_cases=40] [shape=[64,128,128]]``.

Synthetic CT volumes with their reports and VQA questions in the M3D layout (the work is in
:mod:`med3dvlm.data.phantoms`; keys in ``configs/phantoms.yaml``). Writing the same dataset again
is idempotent; ``if_missing=true`` does nothing when the root already holds it.
"""

from __future__ import annotations

import time
from typing import Any

from med3dvlm.cli import UsageError, hydra_command

PROGRAM = "med3dvlm.phantoms"


def _numbers(value: Any, key: str, count: int, kind: type) -> tuple | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (int, float, str)) else list(value)
    try:
        numbers = tuple(kind(item) for item in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count:
        raise UsageError(f"{key}={value!r}: expected {count} numbers, e.g. {key}=[{','.join(['1'] * count)}]")
    return numbers


@hydra_command(PROGRAM, "phantoms")  # a bad size or a foreign folder: one line, status 2
def main(cfg: Any) -> None:
    from med3dvlm.data.phantoms import dataset as phantoms

    build = phantoms.ensure_phantom_dataset if cfg.if_missing else phantoms.make_phantom_dataset
    start = time.perf_counter()
    try:
        dataset = build(
            str(cfg.root),
            num_cases=int(cfg.num_cases) if cfg.num_cases is not None else phantoms.DEFAULT_NUM_CASES,
            shape=_numbers(cfg.shape, "shape", 3, int) or phantoms.DEFAULT_SHAPE,
            seed=int(cfg.seed),
            volume_format=str(cfg.volume_format),
            split_fractions=_numbers(cfg.splits, "splits", 3, float) or phantoms.DEFAULT_SPLIT_FRACTIONS,
            overwrite=bool(cfg.overwrite),
        )
    except (FileExistsError, NotADirectoryError) as error:
        raise UsageError(str(error)) from None
    action = "wrote" if dataset.generated else "found"
    print(f"{action} {dataset.summary()} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
