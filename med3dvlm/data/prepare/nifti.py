"""NIfTI volumes: a series file in a case folder, or a case of its own directly in the raw folder
(users' own CT; its report ``<name>.txt`` beside it). ``load_ct`` reads them (HU, display order)."""

from __future__ import annotations

from pathlib import Path

from med3dvlm.data.prepare.cases import CaseJob, SeriesSource
from med3dvlm.data.prepare.settings import PrepareSettings, ascii_name

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(name: str) -> str | None:
    """``name`` without its NIfTI suffix, or None when it is not a NIfTI file name."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def loose_volume_case(volume: Path, raw_id: str, key: str, out_root: Path, settings: PrepareSettings) -> CaseJob:
    """A NIfTI volume directly in the raw folder: a case of one series, its report ``<raw_id>.txt`` beside it."""
    series = (SeriesSource(raw_id, ascii_name(raw_id).strip(".") or "volume", volume, "nifti"),)
    return CaseJob(key, volume, volume.parent / f"{raw_id}.txt", series, out_root, settings)
