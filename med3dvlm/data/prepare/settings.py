"""What every source shares: the errors, the settings that decide a prepared case, the splits, the
report text and ASCII names (SPEC §6)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from med3dvlm.data import layout
from med3dvlm.data.errors import DataError
from med3dvlm.data.m3d import fold_newlines
from med3dvlm.data.preprocessing import DEFAULT_HU_WINDOW, PREPARED_SHAPE, Preprocessing
from med3dvlm.data.volumes import FAST_VOLUME_FORMAT, VOLUME_ENCODINGS, VOLUME_FORMATS

FINDINGS_MARKER = "study_findings:"  # SPEC §6: the report is what follows this marker ...
DISCUSSION_MARKER = "discussion:"  # ... else what follows this one, else the whole text
MAX_NOTES_PRINTED = 20  # notes are informational; the summary file keeps all of them
PREPARE_SOURCES = ("folders", "ct_rate")  # raw case folders (M3D, NIfTI, DICOM) or CT-RATE as downloaded
SERIES_LAYOUTS = ("file", "folder")  # <case>/<series>.nii.gz (M3D's naming) or <case>/<series>/volume.nii.gz
FOLDER_LAYOUT_VOLUME = "volume"
DEFAULT_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)  # ours: 5% of ~42k cases leaves > 2,000 test pairs (SPEC §7)
REPORT_NAME = "text.txt"  # a prepared case's report, as in M3D's layout
MANIFEST_NAME = ".prepared.json"  # per case, written last
ROOT_MARKER = ".prepare.json"  # marks a root this command writes, so it never overwrites foreign data
PREPARATION_VERSION = 1  # bump when the output of a case changes for the same settings
# Characters a series or case name keeps; every other character becomes "_" (M3D writes
# "Axial C+ portal venous phase" as "Axial_C__portal_venous_phase").
_NAME_CHARACTERS = re.compile(r"[A-Za-z0-9._-]")
# Letters NFKD does not decompose into ASCII.
_TRANSLITERATION = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D",
    "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D", "ı": "i",
}  # fmt: skip


class PreparationError(ValueError):
    """The command cannot start: a setting or folder is wrong. Says what to change."""


class CaseError(DataError):
    """One case cannot be prepared; the message says why and names the file."""


class SeriesError(DataError):
    """One series cannot be prepared; the rest of its case still can."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSettings:
    """What decides the output of a case (stored in its manifest; a change redoes the case)."""

    shape: tuple[int, int, int] = PREPARED_SHAPE
    formats: tuple[str, ...] = ("nii.gz", FAST_VOLUME_FORMAT)  # the first is the one M3D_Cap.json lists
    fast_encoding: str = "uint8"  # voxels of the uncompressed .nii copy (volumes.VOLUME_ENCODINGS)
    hu_window: tuple[float, float] | None = DEFAULT_HU_WINDOW
    reorient: bool = True
    series_layout: str = "file"
    cases_dir: str = "ct_case"
    report_file: str = "text.txt"
    require_report: bool = True

    def __post_init__(self) -> None:
        shape = tuple(int(edge) for edge in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise PreparationError(f"shape must be three positive sizes (D, H, W), got {list(self.shape)}")
        formats = tuple(str(fmt).lstrip(".") for fmt in self.formats)
        if not formats or len(set(formats)) != len(formats) or any(f not in VOLUME_FORMATS for f in formats):
            raise PreparationError(f"formats must be distinct names from {VOLUME_FORMATS}, got {list(self.formats)}")
        if self.fast_encoding not in VOLUME_ENCODINGS:
            raise PreparationError(f"fast_encoding must be one of {VOLUME_ENCODINGS}, got {self.fast_encoding!r}")
        window = None if self.hu_window is None else tuple(float(v) for v in self.hu_window)
        if window is not None and (len(window) != 2 or not window[0] < window[1]):
            raise PreparationError(f"hu_window must be [lower, upper] HU, lower < upper, or null; got {self.hu_window}")
        if self.series_layout not in SERIES_LAYOUTS:
            raise PreparationError(f"series_layout must be one of {SERIES_LAYOUTS}, got {self.series_layout!r}")
        if ascii_name(self.cases_dir) != self.cases_dir or self.cases_dir in ("", ".", ".."):
            raise PreparationError(f"cases_dir must be one plain ASCII folder name, got {self.cases_dir!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "hu_window", window)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape a prepared case (``require_report`` only decides which run)."""
        settings = json.loads(json.dumps(asdict(self)))
        del settings["require_report"]
        return {"version": PREPARATION_VERSION, **settings}

    def preprocessing(self, kind: str) -> Preprocessing:
        """Raw -> prepared for a series of ``kind``: slices by min and max (SPEC §6), CT (NIfTI, DICOM)
        through the HU window; both cropped to the foreground and resized to ``shape``."""
        window = None if kind == "slices" else self.hu_window
        return Preprocessing(hu_window=window, crop_foreground=True, shape=self.shape, reorient=self.reorient)

    def encoding(self, volume_format: str) -> str:
        """The uncompressed copy is the fast one; the others keep float32 (SPEC §6: float volumes)."""
        return self.fast_encoding if volume_format == FAST_VOLUME_FORMAT else "float32"


@dataclass(frozen=True)
class SplitRule:
    """``fractions`` of train/validation/test and the hash ``seed``; or the splits of ``file``."""

    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    seed: int = 0
    file: str | None = None

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise PreparationError(
                f"split.fractions must be three non-negative numbers summing to 1 (train, validation, test), "
                f"got {list(self.fractions)}"
            )
        object.__setattr__(self, "fractions", fractions)


def assign_split(case_key: str, fractions: Sequence[float], seed: int) -> str:
    """The split of a case: where ``u = hash(seed, case_key)`` in [0, 1) falls among the fractions.

    A case's split depends on nothing but its own folder name, so it is the same on every run,
    in every worker, and when other cases are added or removed.
    """
    digest = hashlib.sha256(f"{seed}/{case_key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in zip(layout.CAP_SPLITS, fractions):
        edge += fraction
        if position < edge:
            return split
    # Only float rounding of the fractions' sum gets here: the last split that takes cases.
    return [split for split, fraction in zip(layout.CAP_SPLITS, fractions) if fraction > 0][-1]


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """``{case key: split}`` from a JSON ``{"train": [...], "validation": [...], "test": [...]}``.

    Entries are case keys (``"ct_case/000006"``) or M3D-Cap entries (``{"image": "ct_case/000006/
    Axial.npy", ...}``, M3D's own released JSON), whose case key is the first two path components.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PreparationError(f"split.file {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(content, dict):
        raise PreparationError(f"split.file {path}: expected an object with keys {layout.CAP_SPLITS}")
    split_of: dict[str, str] = {}
    for split in layout.CAP_SPLITS:
        for index, entry in enumerate(content.get(split, [])):
            text = entry.get("image") if isinstance(entry, dict) else entry
            parts = Path(str(text)).parts if isinstance(text, str) else ()
            if len(parts) < 2:
                raise PreparationError(f"split.file {path}: {split}[{index}] names no case folder: {entry!r}")
            key = f"{parts[0]}/{parts[1]}"
            if split_of.setdefault(key, split) != split:
                raise PreparationError(f"split.file {path}: case {key} is listed in both {split_of[key]} and {split}")
    return split_of


# ----------------------------------------------------------------------------------------------
# Text and names
# ----------------------------------------------------------------------------------------------


def extract_report(text: str) -> str:
    """SPEC §6: what follows ``study_findings:``, else ``discussion:``, else all; newlines folded.

    A marker followed by nothing counts as absent, so an empty findings section falls through.
    """
    for marker in (FINDINGS_MARKER, DISCUSSION_MARKER):
        if marker in text:
            section = fold_newlines(text.split(marker, 1)[1])
            if section:
                return section
    return fold_newlines(text)


def ascii_name(name: str) -> str:
    """``name`` in plain ASCII (SPEC §6): accents dropped, letters transliterated, others -> ``_``."""
    decomposed = unicodedata.normalize("NFKD", "".join(_TRANSLITERATION.get(c, c) for c in name))
    kept = (c if _NAME_CHARACTERS.fullmatch(c) else "_" for c in decomposed if not unicodedata.combining(c))
    return "".join(kept)


def unique_names(raw_names: Sequence[str], fallback: str) -> list[str]:
    """ASCII names for ``raw_names`` (in order), made distinct with ``_2``, ``_3`` suffixes."""
    taken: set[str] = set()
    names = []
    for raw in raw_names:
        base = ascii_name(raw).strip(".") or fallback
        name, number = base, 1
        while name.lower() in taken:  # case-insensitive: the output may land on such a file system
            number += 1
            name = f"{base}_{number}"
        taken.add(name.lower())
        names.append(name)
    return names
