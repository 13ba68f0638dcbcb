"""``python -m med3dvlm.data.phantoms``: write the phantom dataset from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.phantoms.dataset import (
    CASES_DIR,
    DEFAULT_NUM_CASES,
    DEFAULT_SHAPE,
    DEFAULT_SPLIT_FRACTIONS,
    MARKER_NAME,
    MAX_SHAPE,
    MIN_CASES,
    MIN_DIM,
    VOLUME_FORMATS,
    ensure_phantom_dataset,
    make_phantom_dataset,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m med3dvlm.data.phantoms",
        description="Write the embedded phantom dataset (synthetic CT volumes, reports, VQA) in the M3D layout.",
        epilog=f"Writes {layout.CAP_JSON}, {CASES_DIR}/NNNNNN/{{text.txt,SERIES/volume.FMT}}, "
        f"{layout.VQA_DIR}/*.csv and the marker {MARKER_NAME} under ROOT.",
    )
    shape = " ".join(map(str, DEFAULT_SHAPE))
    largest = " ".join(map(str, MAX_SHAPE))
    add = parser.add_argument
    add("--root", required=True, type=Path, help="dataset root to write")
    add(
        "--num-cases",
        type=int,
        default=DEFAULT_NUM_CASES,
        help=f"number of cases (default {DEFAULT_NUM_CASES}, at least {MIN_CASES})",
    )
    add(
        "--shape",
        type=int,
        nargs=3,
        default=list(DEFAULT_SHAPE),
        metavar=("D", "H", "W"),
        help=f"volume shape (default {shape}; each at least {MIN_DIM}, at most {largest})",
    )
    add("--seed", type=int, default=0, help="random seed (default 0)")
    add(
        "--format",
        dest="volume_format",
        choices=VOLUME_FORMATS,
        default="nii.gz",
        help="volume file format (default nii.gz)",
    )
    add(
        "--splits",
        type=float,
        nargs=3,
        default=list(DEFAULT_SPLIT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="train/validation/test fractions (default 0.7 0.15 0.15)",
    )
    add("--overwrite", action="store_true", help="write even into a non-empty folder that is not a phantom dataset")
    add("--if-missing", action="store_true", help="do nothing if ROOT already holds this exact dataset")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    build = ensure_phantom_dataset if args.if_missing else make_phantom_dataset
    start = time.perf_counter()
    try:
        dataset = build(
            args.root,
            num_cases=args.num_cases,
            shape=args.shape,
            seed=args.seed,
            volume_format=args.volume_format,
            split_fractions=args.splits,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    action = "wrote" if dataset.generated else "found"
    print(f"{action} {dataset.summary()} in {time.perf_counter() - start:.1f} s")
    return 0
