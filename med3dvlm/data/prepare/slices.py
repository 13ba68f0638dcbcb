"""M3D's raw series: a folder of numbered 2D slices (``0.png, 1.png, ...``, PNG or JPEG) -> ``(D, H, W)``.

SPEC §6: read as greyscale, keep the slices of the most common shape (ties: the shape of the earliest
slice), stack in numeric order; the pipeline then scales by min and max, crops and resizes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from med3dvlm.data.prepare.settings import SeriesError

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")  # SPEC §6: numbered 2D slices, PNG or JPEG
_DIGITS = re.compile(r"[0-9]+")
_PIL_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # kept as numbers, not cut to 8 bits


def numbered_slices(folder: Path) -> list[Path]:
    """The slice files of a series folder in numeric order (``2.png`` before ``10.png``)."""
    by_number: dict[int, Path] = {}
    unexpected = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store and the like
        stem, suffix = os.path.splitext(entry.name)
        if entry.is_file() and suffix.lower() in SLICE_SUFFIXES and _DIGITS.fullmatch(stem):
            number = int(stem)
            if number in by_number:
                raise SeriesError(f"{folder}: slices {by_number[number].name} and {entry.name} have the same number")
            by_number[number] = entry
        else:
            unexpected.append(entry.name)
    if unexpected:
        raise SeriesError(
            f"{folder}: unexpected entries {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}; a series "
            f"folder holds only numbered slices ({', '.join(SLICE_SUFFIXES)})"
        )
    if not by_number:
        raise SeriesError(f"{folder}: no slice files (expected 0.png, 1.png, ...)")
    return [by_number[number] for number in sorted(by_number)]


def read_slice(path: Path) -> np.ndarray:
    """A 2D slice as greyscale numbers (8-bit images as uint8; 16-bit and float kept as they are)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _PIL_HIGH_DEPTH_MODES:
                return np.asarray(image, dtype=np.float32)
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except Exception as exc:  # any decoder failure means the slice is unreadable
        raise SeriesError(f"cannot read slice {path} ({type(exc).__name__}: {exc})") from exc


def stack_slices(paths: Sequence[Path]) -> tuple[np.ndarray, str | None]:
    """``(D, H, W)`` float32 of the slices of the most common shape, and a note on any dropped."""
    slices = [read_slice(path) for path in paths]
    shapes = Counter(array.shape for array in slices)
    common = shapes.most_common(1)[0][0]  # ties: Counter keeps first-seen order, so the earliest slice's shape
    kept = [array for array in slices if array.shape == common]
    note = None
    if len(kept) < len(slices):
        dropped = {f"{h}x{w}": n for (h, w), n in shapes.items() if (h, w) != common}
        note = (
            f"kept {len(kept)} of {len(slices)} slices of shape {common[0]}x{common[1]}; "
            f"dropped other shapes {dropped} (SPEC §6)"
        )
    return np.stack(kept).astype(np.float32), note


def read_slice_series(folder: Path) -> tuple[np.ndarray, str | None]:
    """The ``(D, H, W)`` float32 stack of a slice folder, and a note on any slices dropped."""
    return stack_slices(numbered_slices(folder))


def holds_slices(folder: Path) -> bool:
    return any(p.suffix.lower() in SLICE_SUFFIXES for p in folder.iterdir() if p.is_file())
