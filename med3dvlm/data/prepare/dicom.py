"""DICOM studies in a case folder: DICOM files (loose or in sub-folders, any names) are found by their
``DICM`` preamble, and each image series of the study becomes one series of the case (``load_ct``
reads it: ordered slices, HU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from med3dvlm.data.ct import list_series

DICOM_MAGIC_OFFSET = 128  # DICOM PS3.10 §7.1: a 128-byte preamble, then "DICM"
DICOM_MAGIC = b"DICM"


def is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def holds_dicom(folder: Path) -> bool:
    return any(is_dicom_file(p) for p in folder.rglob("*") if p.is_file())


def dicom_series(study: Path, exclude: Sequence[Path]) -> list[tuple[str, str]]:
    """``(raw name, series UID)`` of every image series of the DICOM study in ``study`` (the files
    under ``exclude`` left out); the raw name is ``<SeriesNumber>_<SeriesDescription>``."""
    series = []
    for info in list_series(study, exclude=list(exclude)):
        raw_name = "_".join(part for part in (info.number, info.description) if part) or "series"
        series.append((raw_name, info.uid))
    return series
