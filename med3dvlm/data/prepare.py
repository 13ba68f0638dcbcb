"""Turn raw M3D-Cap cases, or CT volumes in Hounsfield units, into a dataset in the M3D layout.

What a raw case is (SPEC §6): one folder per case holding a report text file (``text.txt``) and one
sub-folder per series of numbered 2D slices (``0.png, 1.png, ...``, PNG or JPEG). A series may also
be a NIfTI file in the case folder, and a NIfTI file directly in the raw folder is a case of its
own (its report, if any, is ``<name>.txt`` beside it): that is how users bring their own CT.

What preparation does to a series (SPEC §6):

* slices: read as greyscale, keep those of the most common shape (ties: the shape of the earliest
  slice), stack in numeric order as ``(D, H, W)``, scale by min and max to [0, 1];
* NIfTI in HU: reorient to axial display order (slices head to feet, rows front to back, columns
  patient right to left; ``reorient=false`` keeps the file's axes), clip to the HU window and scale
  it to [0, 1] (``hu_window=null``: by min and max, e.g. for MRI); spacing is not used, as in M3D;
* then crop to the foreground (voxels > 0) and resize trilinearly to ``shape`` (128 x 256 x 256).

Report text: what follows ``study_findings:``, else what follows ``discussion:``, else the whole
text (the first of these that is not empty), newlines folded. Series names become ASCII.

Output under ``out_dir`` (``cases_dir`` = ``ct_case`` by default)::

    M3D_Cap.json                          every prepared series, split by case (``assign_split``)
    ct_case/000006/text.txt               the extracted report
    ct_case/000006/Axial_C__portal_venous_phase.nii.gz   float32 [0, 1], M3D's naming
    ct_case/000006/Axial_C__portal_venous_phase.nii      the fast copy (uint8, scl_slope 1/255)
    ct_case/000006/.prepared.json         the case's manifest, written last: the case is finished
    M3D-VQA/*.csv                         with ``vqa_dir``: M3D's CSVs, ``.npy`` paths -> ``.nii.gz``

(``series_layout=folder`` writes ``ct_case/000006/<series>/volume.nii.gz`` instead.)

Resuming: a case whose manifest matches the settings and raw series, and whose files all exist, is
skipped. Every file is written to a temporary name and renamed, so a killed run leaves no
half-written file under a final name; temporary leftovers are removed when the case is redone.

Splits: a case (with all its series) goes to the split given by a hash of ``seed`` and its folder
(``assign_split``), so the split of a case never changes when cases are added or removed; or to the
split an existing ``split.file`` lists it in.

``convert_dataset`` adds fast (or other format) copies of every volume an already prepared
dataset lists. Both run over the available cores and end with a ``Summary``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from med3dvlm.data import layout
from med3dvlm.data.errors import DataError
from med3dvlm.data.ct import list_series, load_ct
from med3dvlm.data.m3d import fold_newlines, read_task_split
from med3dvlm.data.preprocessing import (  # noqa: F401 - PREPARED_SHAPE, crop_and_resize: this module's API too
    DEFAULT_HU_WINDOW,
    PREPARED_SHAPE,
    Preprocessing,
    PreprocessingError,
    crop_and_resize,
    scale_min_max,
    write_preprocessing,
)
from med3dvlm.utils import TEMPORARY_MARK, write_atomic
from med3dvlm.data.volumes import (
    FAST_VOLUME_FORMAT,
    VOLUME_ENCODINGS,
    VOLUME_FORMATS,
    load_volume,
    save_volume,
    with_volume_format,
)

Job = TypeVar("Job")
Result = TypeVar("Result")

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")  # SPEC §6: numbered 2D slices, PNG or JPEG
NIFTI_SUFFIXES = (".nii.gz", ".nii")
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
_DIGITS = re.compile(r"[0-9]+")
_PIL_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # kept as numbers, not cut to 8 bits


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


def _unique_names(raw_names: Sequence[str], fallback: str) -> list[str]:
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


# ----------------------------------------------------------------------------------------------
# Reading a series
# ----------------------------------------------------------------------------------------------


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
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the slice is unreadable
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


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSource:
    raw_name: str  # as on disk (DICOM: "<SeriesNumber>_<SeriesDescription>")
    name: str  # ASCII, unique within the case
    path: Path  # slice folder, NIfTI file, or the study folder holding a DICOM series
    kind: str  # "slices", "nifti" or "dicom"
    series_uid: str | None = None  # DICOM: which series of the study folder
    rescale: tuple[float, float] | None = None  # CT-RATE: (slope, intercept) of its metadata, for stored values
    storage: str | None = None  # CT-RATE: "auto", "stored" or "hu" (med3dvlm.data.ct_rate.STORAGE_MODES)

    def record(self) -> list:
        """What the manifest records of this series, so a changed one is redone."""
        extra = [self.series_uid, None if self.rescale is None else list(self.rescale), self.storage]
        return [self.raw_name, self.kind] + [value for value in extra if value is not None]


@dataclass(frozen=True)
class CaseJob:
    """One case to prepare: where it comes from and where it goes (``key`` = ``cases_dir/id``)."""

    key: str
    source: Path
    report: Path  # where its report is expected (it may be missing)
    series: tuple[SeriesSource, ...]
    out_root: Path
    settings: PrepareSettings
    notes: tuple[str, ...] = ()
    report_text: str | None = None  # from the reports CSV, instead of the report file


    @property
    def out_dir(self) -> Path:
        return self.out_root / self.key

    def sources(self) -> dict[str, Any]:
        """What the manifest records of the input, so a changed raw case is redone."""
        if self.report_text is not None:
            report = "csv:" + hashlib.sha256(self.report_text.encode("utf-8")).hexdigest()[:16]
        else:
            report = self.report.name if self.report.is_file() else None
        return {"report": report, "series": [s.record() for s in self.series]}

    def volume_path(self, series: str, volume_format: str) -> str:
        """Relative path of a series' volume in ``volume_format``."""
        if self.settings.series_layout == "folder":
            return f"{self.key}/{series}/{FOLDER_LAYOUT_VOLUME}.{volume_format}"
        return f"{self.key}/{series}.{volume_format}"


@dataclass
class CaseResult:
    """What happened to one case (or, in ``convert_dataset``, one volume)."""

    key: str
    status: str  # "prepared", "skipped" (done by an earlier run) or "failed"
    reason: str = ""
    problems: list[str] = field(default_factory=list)  # series left out, with why
    notes: list[str] = field(default_factory=list)  # worth knowing, nothing lost against SPEC §6
    seconds: float = 0.0


def _nifti_stem(name: str) -> str | None:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def find_cases(
    raw_dir: Path, out_root: Path, settings: PrepareSettings, reports: Mapping[str, str] | None = None
) -> tuple[list[CaseJob], list[CaseResult], list[str]]:
    """Every case under ``raw_dir``; cases that cannot be prepared (failed); entries ignored, with why.

    ``reports``: case folder name -> report text (a reports CSV), used instead of the report file."""
    entries = sorted(entry for entry in raw_dir.iterdir() if not entry.name.startswith("."))
    stems = {entry.name: _nifti_stem(entry.name) for entry in entries if entry.is_file()}
    loose_volumes = {name: stem for name, stem in stems.items() if stem}
    loose_reports = {f"{stem}.txt" for stem in loose_volumes.values()}
    jobs: list[CaseJob] = []
    failed: list[CaseResult] = []
    ignored: list[str] = []
    owner: dict[str, Path] = {}
    for entry in entries:
        if entry.is_file() and entry.name in loose_reports:
            continue  # the report of a loose NIfTI case
        raw_id = entry.name if entry.is_dir() else loose_volumes.get(entry.name)
        if raw_id is None:
            ignored.append(f"{entry}: ignored (neither a case folder nor a NIfTI volume)")
            continue
        key = f"{settings.cases_dir}/{ascii_name(raw_id).strip('.') or 'case'}"
        if key in owner:
            failed.append(CaseResult(key, "failed", f"{entry}: its ASCII name {key} is already taken by {owner[key]}"))
            continue
        owner[key] = entry
        if entry.is_dir():
            try:
                job = _folder_case(entry, key, out_root, settings)
            except DataError as exc:  # e.g. an unreadable DICOM file met while listing the series
                failed.append(CaseResult(key, "failed", str(exc)))
                continue
            if reports is not None and entry.name in reports:
                job = dataclasses.replace(job, report_text=reports[entry.name])
            jobs.append(job)
        else:
            series = (SeriesSource(raw_id, ascii_name(raw_id).strip(".") or "volume", entry, "nifti"),)
            jobs.append(CaseJob(key, entry, raw_dir / f"{raw_id}.txt", series, out_root, settings))
    return jobs, failed, ignored


def _folder_case(folder: Path, key: str, out_root: Path, settings: PrepareSettings) -> CaseJob:
    """A case folder: slice folders and NIfTI files are series; a study of DICOM files (loose or in
    sub-folders, any names) gives one series per DICOM image series."""
    report = folder / settings.report_file
    sources: list[tuple[str, Path, str, str | None]] = []
    notes = []
    dicom_study = False
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry == report:
            continue
        if entry.is_dir() and (_holds_slices(entry) or not _holds_dicom(entry)):
            sources.append((entry.name, entry, "slices", None))  # an empty folder fails as a slice series
        elif entry.is_dir() or _is_dicom_file(entry):
            dicom_study = True
        elif _nifti_stem(entry.name):
            sources.append((_nifti_stem(entry.name), entry, "nifti", None))
        else:
            notes.append(f"{entry}: ignored (neither a series folder, a NIfTI volume, DICOM nor {settings.report_file})")
    if dicom_study:
        for info in list_series(folder, exclude=[path for _, path, kind, _ in sources if kind != "dicom"]):
            raw_name = "_".join(part for part in (info.number, info.description) if part) or "series"
            sources.append((raw_name, folder, "dicom", info.uid))
    names = _unique_names([raw for raw, _, _, _ in sources], fallback="series")
    series = tuple(SeriesSource(raw, name, path, kind, uid) for (raw, path, kind, uid), name in zip(sources, names))
    return CaseJob(key, folder, report, series, out_root, settings, tuple(notes))


def _holds_slices(folder: Path) -> bool:
    return any(p.suffix.lower() in SLICE_SUFFIXES for p in folder.iterdir() if p.is_file())


def _holds_dicom(folder: Path) -> bool:
    return any(_is_dicom_file(p) for p in folder.rglob("*") if p.is_file())


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def read_reports_csv(path: str | os.PathLike) -> dict[str, str]:
    """``case,report`` CSV -> {case folder name: report}; an error names the file and row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PreparationError(f"reports_csv {path}: cannot read ({exc})") from exc
    rows = csv.DictReader(io.StringIO(text))
    if not rows.fieldnames or not {"case", "report"} <= set(rows.fieldnames):
        raise PreparationError(f"reports_csv {path}: needs the columns case,report; found {rows.fieldnames}")
    reports: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        case, report = (row.get("case") or "").strip(), fold_newlines(row.get("report") or "")
        if not case or not report:
            raise PreparationError(f"reports_csv {path} row {number}: empty {'case' if not case else 'report'}")
        if case in reports:
            raise PreparationError(f"reports_csv {path} row {number}: case {case!r} is listed twice")
        reports[case] = report
    return reports


def read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_prepared(job: CaseJob) -> dict | None:
    """The case's manifest when an earlier run finished it with the same settings and input."""
    manifest = read_manifest(job.out_dir / MANIFEST_NAME)
    if (
        manifest is None
        or manifest.get("settings") != job.settings.fingerprint()
        or manifest.get("sources") != job.sources()
    ):
        return None
    files = [manifest.get("report")] + [f for s in manifest.get("series", []) for f in s.get("files", {}).values()]
    if not all(isinstance(f, str) and (job.out_root / f).is_file() for f in files if f is not None):
        return None
    return manifest


def prepare_case(job: CaseJob) -> CaseResult:
    """Prepare one case; never raises, so one bad case cannot stop the others."""
    start = time.perf_counter()
    try:
        result = _prepare_case(job)
    except Exception as exc:  # noqa: BLE001 - reported in the summary with the case
        reason = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        result = CaseResult(job.key, "failed", reason, notes=list(job.notes))
    result.seconds = time.perf_counter() - start
    return result


def _prepare_case(job: CaseJob) -> CaseResult:
    settings = job.settings
    # An earlier manifest describes outputs of other settings or input: the case is unfinished
    # until this run writes its own, so a failure now cannot leave stale volumes listed.
    (job.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    report = _case_report(job)
    if not job.series:
        raise CaseError(f"{job.source}: no series (no slice folder, no NIfTI volume, no DICOM series)")
    remove_temporary_files(job.out_dir)
    problems, notes, written = [], list(job.notes), []
    for series in job.series:
        where = f"{job.source}: series {series.raw_name!r}"
        try:
            volume, note = _series_volume(series, settings, where)
        except DataError as exc:  # SeriesError, PreprocessingError, an unreadable or refused volume
            problems.append(f"series {series.raw_name!r} left out: {exc}")
            continue
        if note:
            notes.append(f"series {series.raw_name!r}: {note}")
        files = {}
        for volume_format in settings.formats:
            relative = job.volume_path(series.name, volume_format)
            save_volume(volume, job.out_root / relative, encoding=settings.encoding(volume_format))
            files[volume_format] = relative
        image = files[settings.formats[0]]
        written.append({"raw_name": series.raw_name, "name": series.name, "image": image, "files": files})
    if not written:
        raise CaseError(f"{job.source}: no usable series: " + "; ".join(problems))
    report_path = None
    if report is not None:
        report_path = f"{job.key}/{REPORT_NAME}"
        write_atomic(job.out_root / report_path, (report + "\n").encode("utf-8"))
    manifest = {
        "case": job.key,
        "source": str(job.source),
        "settings": settings.fingerprint(),
        "sources": job.sources(),
        "report": report_path,
        "series": written,
        "problems": problems,
        "notes": notes,
    }
    write_atomic(job.out_dir / MANIFEST_NAME, _json_bytes(manifest))
    return CaseResult(job.key, "prepared", problems=problems, notes=notes)


def _case_report(job: CaseJob) -> str | None:
    if job.report_text is not None:
        return job.report_text
    if not job.report.is_file():
        if job.settings.require_report:
            raise CaseError(f"{job.source}: no report file {job.report} (require_report=false: volumes alone)")
        return None
    try:
        text = job.report.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaseError(f"{job.report}: report is not UTF-8 text ({exc})") from exc
    report = extract_report(text)
    if not report:
        raise CaseError(f"{job.report}: report holds no text")
    return report


def _series_volume(series: SeriesSource, settings: PrepareSettings, where: str) -> tuple[np.ndarray, str | None]:
    """The prepared ``(D, H, W)`` volume of one series: read, then the one preprocessing (see
    ``med3dvlm.data.preprocessing``) that inference applies too."""
    note = None
    if series.kind == "slices":
        volume, note = stack_slices(numbered_slices(series.path))
    elif series.kind == "ct_rate":
        from med3dvlm.data.ct_rate import read_ct_rate_volume

        volume, note = read_ct_rate_volume(series.path, series.rescale, series.storage or "auto", settings.reorient)
    else:
        volume = load_ct(series.path, series=series.series_uid, reorient=settings.reorient).volume
    return settings.preprocessing(series.kind).apply(volume, where), note


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def _json_bytes(content: object) -> bytes:
    return (json.dumps(content, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def remove_temporary_files(folder: Path) -> int:
    """Delete what a killed run left under temporary names (``.<name>.<hex>.tmp*``) in ``folder``."""
    if not folder.is_dir():
        return 0
    leftovers = [p for p in folder.rglob(".*") if p.is_file() and TEMPORARY_MARK in p.name]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


# ----------------------------------------------------------------------------------------------
# M3D_Cap.json and M3D-VQA
# ----------------------------------------------------------------------------------------------


def write_cap_json(out_root: Path, split: SplitRule) -> tuple[dict[str, int], list[str], int]:
    """``M3D_Cap.json`` listing every prepared series under ``out_root``; counts, problems, and the
    number of cases prepared without a report (``require_report=false``), which it cannot list.

    Built from the manifests, so it also lists cases that earlier runs prepared (e.g. ``ct_case``
    and ``ct_quizze`` prepared one after the other).
    """
    listed_split = read_split_file(split.file) if split.file else None
    cap: dict[str, list[dict[str, str]]] = {name: [] for name in layout.CAP_SPLITS}
    problems = []
    without_report = 0
    for manifest_path in sorted(out_root.glob(f"*/*/{MANIFEST_NAME}")):
        manifest = read_manifest(manifest_path)
        if manifest is None or not isinstance(manifest.get("case"), str):
            problems.append(f"{manifest_path}: unreadable manifest; the case is not listed (rerun to redo it)")
            continue
        key, report = manifest["case"], manifest.get("report")
        if report is None:
            without_report += 1  # volumes alone: nothing to pair them with
            continue
        if listed_split is not None:
            if key not in listed_split:
                problems.append(f"{key}: not in split.file {split.file}; not listed in {layout.CAP_JSON}")
                continue
            case_split = listed_split[key]
        else:
            case_split = assign_split(key, split.fractions, split.seed)
        for series in manifest.get("series", []):
            if not (out_root / series["image"]).is_file():
                problems.append(f"{key}: {series['image']} is missing; not listed (rerun to redo the case)")
                continue
            cap[case_split].append({"image": series["image"], "text": report})
    write_atomic(out_root / layout.CAP_JSON, _json_bytes(cap))
    return {name: len(entries) for name, entries in cap.items()}, problems, without_report


def rewrite_vqa_csvs(vqa_dir: Path, out_root: Path, volume_format: str) -> tuple[list[str], list[str], list[str]]:
    """Copy M3D's VQA CSVs into ``out_root/M3D-VQA`` with ``.npy`` image paths -> ``volume_format``.

    SPEC §6: M3D released its volumes as ``.npy``; a column rewrite adapts its CSVs. Returns lines
    for the summary: what was written, problems (rows that could not be rewritten, named by file
    and row; they are copied unchanged so the checker and readers flag them too), notes.
    """
    written, problems, notes = [], [], []
    names = [*layout.VQA_CSV.values(), *layout.VQA_YN_CSV.values()]
    present = [name for name in names if (vqa_dir / name).is_file()]
    if not present:
        return [], [f"{vqa_dir}: none of the M3D-VQA CSVs {names} found"], []
    for name in names:
        if name not in present:
            notes.append(f"{vqa_dir / name}: not present, not copied")
            continue
        try:
            line, row_problems = _rewrite_vqa_csv(vqa_dir / name, out_root, volume_format)
        except (OSError, csv.Error, UnicodeDecodeError, DataError) as exc:
            problems.append(f"{vqa_dir / name}: not copied: {exc}")
            continue
        written.append(line)
        problems.extend(row_problems)
    return written, problems, notes


def _rewrite_vqa_csv(source: Path, out_root: Path, volume_format: str) -> tuple[str, list[str]]:
    with source.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    header = [name.strip() for name in rows[0]] if rows else []
    if "Image Path" not in header:
        raise DataError(f"row 1 (header) has no 'Image Path' column; it has {header}")
    column = header.index("Image Path")
    problems, rewritten, missing = [], 0, 0
    target_suffix = "." + volume_format
    for row_number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) <= column:
            problems.append(f"{source}: row {row_number}: {len(row)} fields, no 'Image Path'; copied unchanged")
            continue
        path = row[column].strip()
        if path.lower().endswith(".npy"):
            row[column] = path[: -len(".npy")] + target_suffix
            rewritten += 1
        elif not path.lower().endswith(layout.VOLUME_SUFFIXES):
            problems.append(f"{source}: row {row_number}: 'Image Path' {path!r} is not a volume file; copied unchanged")
            continue
        if not (out_root / row[column].strip()).is_file():
            missing += 1
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows[1:]])
    target = out_root / layout.VQA_DIR / source.name
    write_atomic(target, buffer.getvalue().encode("utf-8"))
    line = f"{target}: {len(rows) - 1} rows, {rewritten} image paths .npy -> {target_suffix}"
    if missing:
        line += f"; {missing} rows name a volume not (yet) in {out_root}"
    return line, problems


# ----------------------------------------------------------------------------------------------
# Converting an existing dataset to another volume format
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertJob:
    source: Path
    targets: tuple[tuple[Path, str], ...]  # (path, encoding)


def listed_volumes(root: Path) -> tuple[list[Path], list[str]]:
    """Every volume the M3D-Cap JSON and VQA CSVs under ``root`` list (each once), and problems."""
    volumes: dict[Path, None] = {}
    problems = []
    files = {"caption": {split: root / layout.CAP_JSON for split in layout.CAP_SPLITS}}
    files["vqa_closed"] = {split: root / layout.VQA_DIR / name for split, name in layout.VQA_CSV.items()}
    files["vqa_yes_no"] = {split: root / layout.VQA_DIR / name for split, name in layout.VQA_YN_CSV.items()}
    for task, by_split in files.items():  # vqa_open lists the same rows as vqa_closed
        for split, path in by_split.items():
            if not path.is_file():
                continue  # a dataset need not have every file
            try:
                result = read_task_split(root, task, split, on_bad_sample="skip")
            except DataError as exc:
                problems.append(str(exc))
                continue
            volumes.update((sample.image_path, None) for sample in result.samples)
            problems.extend(f"{skipped.source}: {skipped.reason}" for skipped in result.skipped)
    return list(volumes), problems


def convert_volume(job: ConvertJob) -> CaseResult:
    """Write the missing format copies of one volume; never raises."""
    start = time.perf_counter()
    try:
        volume = load_volume(job.source)
        for path, encoding in job.targets:
            save_volume(volume, path, encoding=encoding)
        result = CaseResult(str(job.source), "prepared")
    except Exception as exc:  # noqa: BLE001 - reported in the summary with the volume
        result = CaseResult(str(job.source), "failed", f"{type(exc).__name__}: {exc}")
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# Running many jobs
# ----------------------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def one_torch_thread() -> None:
    """Worker initializer: one torch thread per process, as the processes already use every core."""
    import torch

    torch.set_num_threads(1)


def run_jobs(
    function: Callable[[Job], Result],
    jobs: Sequence[Job],
    crashed: Callable[[Job, BaseException], Result],
    workers: int,
    progress: bool,
    description: str,
    initializer: Callable[[], None] | None = one_torch_thread,
    unit: str = "case",
) -> Iterator[Result]:
    """``function(job)`` for every job on ``workers`` processes, in completion order, with a bar.

    A job whose process dies (e.g. killed for memory) becomes ``crashed(job, error)``, never a gap.
    """
    from tqdm import tqdm

    workers = max(1, min(workers, len(jobs)))
    bar = {"total": len(jobs), "desc": description, "unit": unit, "disable": not progress, "file": sys.stderr}
    if workers == 1:
        with tqdm(**bar) as progress_bar:
            for job in jobs:
                yield function(job)
                progress_bar.update()
        return
    # fork shares the already imported numpy/torch/MONAI with the workers (seconds saved per
    # worker); it is safe only while this process runs a single thread.
    use_fork = sys.platform.startswith("linux") and threading.active_count() == 1
    context = multiprocessing.get_context("fork") if use_fork else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer) as pool:
        futures = {pool.submit(function, job): job for job in jobs}
        try:
            with tqdm(**bar) as progress_bar:
                for future in as_completed(futures):
                    try:
                        result = future.result()
                    except Exception as exc:  # noqa: BLE001 - the worker process died
                        result = crashed(futures[future], exc)
                    progress_bar.update()
                    yield result
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """The outcome of one run: every case is done, skipped or failed with a reason."""

    title: str
    results: list[CaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # outside any one case (JSON, CSVs)
    notes: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unit: str = "cases"

    def of(self, status: str) -> list[CaseResult]:
        return sorted((r for r in self.results if r.status == status), key=lambda r: r.key)

    @property
    def exit_code(self) -> int:
        """1 when a case failed (everything else still ran), else 0."""
        return 1 if self.of("failed") else 0

    def text(self) -> str:
        prepared, skipped, failed = self.of("prepared"), self.of("skipped"), self.of("failed")
        lines = [
            self.title,
            (
                f"{len(self.results)} {self.unit}: {len(prepared)} done, {len(skipped)} skipped (done before), "
                f"{len(failed)} failed  [{self.seconds:.1f} s]"
            ),
        ]
        if failed:
            lines.append(f"failed ({len(failed)}):")
            lines += [f"  {r.key}: {r.reason}" for r in failed]
        case_problems = [f"  {r.key}: {p}" for r in sorted(self.results, key=lambda r: r.key) for p in r.problems]
        if case_problems or self.problems:
            lines.append(f"problems ({len(case_problems) + len(self.problems)}):")
            lines += case_problems + [f"  {p}" for p in self.problems]
        notes = [f"  {r.key}: {n}" for r in sorted(self.results, key=lambda r: r.key) for n in r.notes]
        notes += [f"  {n}" for n in self.notes]
        if notes:
            lines.append(f"notes ({len(notes)}):")
            lines += notes[:MAX_NOTES_PRINTED]
            if len(notes) > MAX_NOTES_PRINTED:
                lines.append(f"  ... and {len(notes) - MAX_NOTES_PRINTED} more (all in the summary file)")
        lines += self.outputs
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": round(self.seconds, 3),
            "counts": {status: len(self.of(status)) for status in ("prepared", "skipped", "failed")},
            "failed": {r.key: r.reason for r in self.of("failed")},
            "problems": [f"{r.key}: {p}" for r in self.results for p in r.problems] + self.problems,
            "notes": [f"{r.key}: {n}" for r in self.results for n in r.notes] + self.notes,
            "outputs": self.outputs,
        }


# ----------------------------------------------------------------------------------------------
# The two commands
# ----------------------------------------------------------------------------------------------


def prepare_dataset(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: PrepareSettings = PrepareSettings(),
    split: SplitRule = SplitRule(),
    vqa_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    reports_csv: str | os.PathLike | None = None,
) -> Summary:
    """Prepare every case of ``raw_dir`` into ``out_dir`` (module docstring); resumable.

    ``reports_csv``: a ``case,report`` CSV giving the report of each case folder (else its report file)."""
    start = time.perf_counter()
    raw_dir, out_root = check_folders(raw_dir, out_dir, settings, overwrite)
    if split.file:
        read_split_file(split.file)  # a bad split file fails before hours of work
    reports = read_reports_csv(reports_csv) if reports_csv else None
    jobs, failed, ignored = find_cases(raw_dir, out_root, settings, reports)
    if not jobs and not failed:
        raise PreparationError(f"raw_dir {raw_dir} holds no case folder and no NIfTI volume")
    summary = Summary(f"prepare {raw_dir} -> {out_root}", results=list(failed), notes=ignored)
    if reports is not None:
        unused = sorted(set(reports) - {job.source.name for job in jobs})
        if unused:
            summary.notes.append(f"reports_csv: {len(unused)} case(s) without a folder in raw_dir, e.g. {unused[0]!r}")
    run_cases(jobs, out_root, settings, split, summary, workers, progress)
    if vqa_dir is not None:
        written, problems, notes = rewrite_vqa_csvs(Path(vqa_dir), out_root, settings.formats[0])
        summary.outputs += written + notes
        summary.problems += problems
    summary.seconds = time.perf_counter() - start
    return summary


def check_folders(raw_dir, out_dir, settings: PrepareSettings, overwrite: bool) -> tuple[Path, Path]:
    """``raw_dir`` must exist, ``out_dir`` must not lie inside it and must be ours (or ``overwrite``)."""
    raw_dir, out_root = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise PreparationError(f"raw_dir {raw_dir} is not a folder")
    raw_resolved, out_resolved = raw_dir.resolve(), out_root.resolve()
    inside_raw = out_resolved == raw_resolved or raw_resolved in out_resolved.parents
    if inside_raw or out_resolved / settings.cases_dir == raw_resolved:
        raise PreparationError(
            f"out_dir {out_root} would write into raw_dir {raw_dir}; choose an out_dir outside it "
            f"(and not the folder above it when cases_dir={settings.cases_dir} is its name)"
        )
    _claim_output(out_root, overwrite)
    return raw_dir, out_root


def run_cases(
    jobs: Sequence[CaseJob],
    out_root: Path,
    settings: PrepareSettings,
    split: SplitRule,
    summary: Summary,
    workers: int | None,
    progress: bool,
) -> None:
    """Prepare the ``jobs`` not done before (in parallel), then write the preprocessing record and
    ``M3D_Cap.json``; everything goes into ``summary``."""
    todo = []
    for job in jobs:
        manifest = is_prepared(job)
        if manifest is None:
            todo.append(job)
        else:
            earlier = [f"(earlier run) {p}" for p in manifest.get("problems", [])]
            summary.results.append(CaseResult(job.key, "skipped", problems=earlier))
    if todo:
        import monai.transforms  # noqa: F401 - imported once here, shared with forked workers

    def crashed(job: CaseJob, error: BaseException) -> CaseResult:
        return CaseResult(job.key, "failed", f"worker process died ({type(error).__name__}: {error})")

    workers = available_cores() if workers is None else max(1, int(workers))
    summary.results += run_jobs(prepare_case, todo, crashed, workers, progress, "prepare")
    record = _record_preprocessing(out_root, settings, jobs)
    summary.outputs.append(f"{out_root / 'preprocessing.json'}: {record.describe()} (applied to raw input at inference)")
    counts, problems, without_report = write_cap_json(out_root, split)
    summary.problems += problems
    listed = ", ".join(f"{name} {count}" for name, count in counts.items())
    unpaired = f" ({without_report} cases without a report not listed)" if without_report else ""
    summary.outputs.append(f"{out_root / layout.CAP_JSON}: {listed} entries{unpaired}")


def _record_preprocessing(out_root: Path, settings: PrepareSettings, jobs: Sequence[CaseJob]) -> Preprocessing:
    """The root's record of what raw CT went through: the CT preprocessing when any series is CT (NIfTI
    or DICOM), else the slices' min-max one. A model trained here applies it to raw input."""
    kinds = {series.kind for job in jobs for series in job.series}
    record = settings.preprocessing("slices" if kinds == {"slices"} else "nifti")
    write_preprocessing(out_root, record)
    return record


def convert_dataset(
    root: str | os.PathLike,
    formats: Sequence[str] = ("nii.gz", FAST_VOLUME_FORMAT),
    fast_encoding: str = "uint8",
    workers: int | None = None,
    progress: bool = True,
) -> Summary:
    """Give every volume the dataset at ``root`` lists a copy in each of ``formats`` it lacks.

    E.g. the fast ``x.nii`` beside each listed ``x.nii.gz``, or ``.nii.gz`` and ``.nii`` beside
    M3D's released ``.npy``. Existing copies are kept (they were written atomically, so they are
    complete), which makes the conversion resumable.
    """
    start = time.perf_counter()
    root = Path(root)
    settings = PrepareSettings(formats=tuple(formats), fast_encoding=fast_encoding)
    if not root.is_dir():
        raise PreparationError(f"convert: {root} is not a folder")
    volumes, problems = listed_volumes(root)
    if not volumes and not problems:
        raise PreparationError(f"convert: {root} lists no volume ({layout.CAP_JSON} and {layout.VQA_DIR}/*.csv)")
    summary = Summary(f"convert {root} to {', '.join(settings.formats)}", problems=problems, unit="volumes")
    jobs = []
    for source in volumes:
        targets = []
        for volume_format in settings.formats:
            target = with_volume_format(source, volume_format)
            if target != source and not target.is_file():
                targets.append((target, settings.encoding(volume_format)))
        if targets:
            jobs.append(ConvertJob(source, tuple(targets)))
        else:
            summary.results.append(CaseResult(str(source), "skipped"))

    def crashed(job: ConvertJob, error: BaseException) -> CaseResult:
        return CaseResult(str(job.source), "failed", f"worker process died ({type(error).__name__}: {error})")

    workers = available_cores() if workers is None else max(1, int(workers))
    summary.results += run_jobs(convert_volume, jobs, crashed, workers, progress, "convert", None, "volume")
    summary.seconds = time.perf_counter() - start
    return summary


def _claim_output(out_root: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder this command did not write, unless ``overwrite``."""
    marker = out_root / ROOT_MARKER
    if out_root.exists() and not out_root.is_dir():
        raise PreparationError(f"out_dir {out_root} exists and is not a folder")
    if out_root.is_dir() and any(out_root.iterdir()) and not marker.is_file() and not overwrite:
        raise PreparationError(
            f"out_dir {out_root} is not empty and was not written by this command ({ROOT_MARKER} missing); "
            "choose an empty folder, or pass overwrite=true to add to it"
        )
    write_atomic(marker, _json_bytes({"generator": "med3dvlm.prepare", "version": PREPARATION_VERSION}))


def run_from_config(cfg: Mapping[str, Any]) -> Summary:
    """Run what a ``configs/prepare.yaml`` config asks for; print and save the summary."""
    common = {"workers": cfg.get("workers"), "progress": bool(cfg.get("progress", True))}
    formats = tuple(cfg.get("formats") or ("nii.gz", FAST_VOLUME_FORMAT))
    if cfg.get("convert"):
        if cfg.get("raw_dir"):
            raise PreparationError("give either raw_dir=... out_dir=... or convert=..., not both")
        summary = convert_dataset(cfg["convert"], formats, cfg.get("fast_encoding", "uint8"), **common)
    elif cfg.get("source", "folders") not in PREPARE_SOURCES:
        raise PreparationError(f"source must be one of {PREPARE_SOURCES}, got {cfg.get('source')!r}")
    else:
        if not cfg.get("raw_dir") or not cfg.get("out_dir"):
            raise PreparationError(
                "nothing to do: give raw_dir=RAW out_dir=OUT (prepare raw cases) or convert=ROOT "
                "(add fast copies to a prepared dataset)"
            )
        settings = PrepareSettings(
            shape=tuple(cfg.get("shape") or PREPARED_SHAPE),
            formats=formats,
            fast_encoding=cfg.get("fast_encoding", "uint8"),
            hu_window=None if cfg.get("hu_window") is None else tuple(cfg["hu_window"]),
            reorient=bool(cfg.get("reorient", True)),
            series_layout=cfg.get("series_layout", "file"),
            cases_dir=cfg.get("cases_dir", "ct_case"),
            report_file=cfg.get("report_file", "text.txt"),
            require_report=bool(cfg.get("require_report", True)),
        )
        if cfg.get("source") == "ct_rate":
            from med3dvlm.data.prepare_ct_rate import prepare_ct_rate

            options = cfg.get("ct_rate") or {}
            if options.get("hu_window") is not None:
                settings = dataclasses.replace(settings, hu_window=tuple(options["hu_window"]))
            summary = prepare_ct_rate(
                cfg["raw_dir"], cfg["out_dir"], settings, rad3d_dir=cfg.get("rad3d_dir"),
                test_fraction=float(options.get("test_fraction", 0.5)), seed=int(options.get("seed", 0)),
                storage=str(options.get("storage", "auto")), overwrite=bool(cfg.get("overwrite")), **common,
            )
            print(summary.text())
            if cfg.get("summary_file"):
                write_atomic(Path(cfg["summary_file"]), _json_bytes(summary.to_json()))
            return summary
        split_cfg = cfg.get("split") or {}
        split = SplitRule(
            fractions=tuple(split_cfg.get("fractions") or DEFAULT_SPLIT_FRACTIONS),
            seed=int(split_cfg.get("seed") or 0),
            file=split_cfg.get("file"),
        )
        summary = prepare_dataset(
            cfg["raw_dir"], cfg["out_dir"], settings, split, cfg.get("vqa_dir"), overwrite=bool(cfg.get("overwrite")),
            reports_csv=cfg.get("reports_csv"), **common,
        )
    print(summary.text())
    if cfg.get("summary_file"):
        write_atomic(Path(cfg["summary_file"]), _json_bytes(summary.to_json()))
    return summary


