"""Checking a dataset root in the M3D layout, listing every problem, not just the first
(``python -m med3dvlm.check``).

    python -m med3dvlm.check root=DIR [volume_format=nii] [shape=null] [load_volumes=false]

What is checked (options in ``configs/check.yaml``):

* ``M3D_Cap.json`` and the M3D-VQA CSVs that are present: readable, every split present, CSV
  headers with the required columns; every entry and row as the readers see it: fields present,
  question type 1-5, answer letter A-D, yes/no answers, report non-empty, paths relative and
  inside the root, the listed volume present (its ``volume_format`` sibling, if one is set);
* every listed volume, each once: it loads (``load_volume``: decodable, finite), has the shape
  ``(1, *shape)`` (SPEC §6: 1 x 128 x 256 x 256) and values within ``value_range`` ([0, 1]).

Each problem names the file and the JSON entry or CSV row. Exit status 1 when there is any.

    python -m med3dvlm.check ct=PATH [series=UID]

checks raw CT before preparing or asking a model about it: a NIfTI file, or a folder (or ``.zip``)
of DICOM files. Every image series found is read as ``load_ct`` reads it (ordered slices, spacing,
HU) and listed with its size, spacing and HU range, without any patient-identifying header field;
a series that cannot be read (several series mixed, missing slice, tilt, ...) is a problem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med3dvlm.data import ct_rate, layout
from med3dvlm.data.errors import DataError
from med3dvlm.data.m3d import ReadResult, SkippedSample, read_cap_json, read_vqa_csv, read_vqa_yes_no_csv
from med3dvlm.data.preprocessing import PREPARED_SHAPE
from med3dvlm.data.samples import Sample
from med3dvlm.data.volumes import load_volume, with_volume_format
from med3dvlm.utils import available_cores, json_bytes, run_jobs, write_atomic

VALUE_RANGE = (0.0, 1.0)  # SPEC §6: prepared volumes are in [0, 1]
RANGE_TOLERANCE = 1e-6  # float rounding of a resize or an integer encoding's scale
PROBLEM_KINDS = ("file", "record", "volume")  # a whole file, one entry/row, one volume file


@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    message: str  # names the file, and the entry or row


@dataclass(frozen=True)
class VolumeJob:
    path: Path
    listed_by: str  # the first entry/row naming it
    listings: int  # how many entries/rows name it
    shape: tuple[int, ...] | None  # expected (1, D, H, W), or None for any
    value_range: tuple[float, float] | None


@dataclass
class CheckReport:
    """Everything the check found under ``root``."""

    root: Path
    files: list[str] = field(default_factory=list)  # the dataset files that were checked
    absent: list[str] = field(default_factory=list)  # layout files not present (fine, if others are)
    records: int = 0  # entries and rows that passed
    volumes: int = 0  # distinct volumes checked
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    info: list[str] = field(default_factory=list)  # what was found (ct= checks)
    _seen: set[Problem] = field(default_factory=set, repr=False)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def add(self, kind: str, message: str) -> None:
        problem = Problem(kind, message)
        if problem not in self._seen:  # e.g. one malformed JSON, seen by all three splits
            self._seen.add(problem)
            self.problems.append(problem)

    def text(self, max_listed: int | None = 50) -> str:
        lines = [
            (
                f"check {self.root}: {len(self.files)} files, {self.records} good records, "
                f"{self.volumes} volumes [{self.seconds:.1f} s]"
            ),
        ]
        lines += [f"  {line}" for line in self.info]
        if self.absent:
            lines.append(f"not present: {', '.join(self.absent)}")
        if not self.problems:
            lines.append("no problems found")
            return "\n".join(lines)
        counts = ", ".join(f"{sum(p.kind == kind for p in self.problems)} {kind}" for kind in PROBLEM_KINDS)
        lines.append(f"{len(self.problems)} problems ({counts}):")
        for kind in PROBLEM_KINDS:
            messages = [p.message for p in self.problems if p.kind == kind]
            shown = messages if max_listed is None else messages[:max_listed]
            lines += [f"  [{kind}] {message}" for message in shown]
            if len(shown) < len(messages):
                lines.append(f"  [{kind}] ... and {len(messages) - len(shown)} more (all in the report file)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "files": self.files,
            "absent": self.absent,
            "records": self.records,
            "volumes": self.volumes,
            "problems": [{"kind": p.kind, "message": p.message} for p in self.problems],
            "info": self.info,
        }


def check_dataset(
    root: str | os.PathLike,
    shape: Sequence[int] | None = PREPARED_SHAPE,
    value_range: Sequence[float] | None = VALUE_RANGE,
    volume_format: str | None = None,
    load_volumes: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> CheckReport:
    """Check ``root`` (module docstring); ``shape`` / ``value_range`` None accept any."""
    start = time.perf_counter()
    root = Path(root)
    with_volume_format("volume.nii.gz", volume_format)  # a misspelt format is a usage error, not a finding
    report = CheckReport(root)
    if not root.is_dir():
        report.add("file", f"{root}: not a folder")
        return report
    listed: dict[Path, list[str]] = {}
    with _quiet_reader_warnings():  # every skipped record is in the report; no per-file warning too
        _check_records(root, volume_format, report, listed)
    if not report.files:

        report.add("file", f"{root}: no {layout.CAP_JSON} and no {layout.VQA_DIR}/*.csv; is this a dataset root?")
    report.files = sorted(set(report.files))
    report.absent = sorted(set(report.absent))
    report.volumes = len(listed)
    if load_volumes and listed:
        expected_shape = None if shape is None else (1, *(int(edge) for edge in shape))
        bounds = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        jobs = [VolumeJob(path, sources[0], len(sources), expected_shape, bounds) for path, sources in listed.items()]
        workers = available_cores() if workers is None else int(workers)
        for messages in run_jobs(inspect_volume, jobs, _crashed, workers, progress, "check", initializer=None):
            for message in messages:
                report.add("volume", message)
    report.seconds = time.perf_counter() - start
    return report


def check_ct(path: str | os.PathLike, series: str | None = None) -> CheckReport:
    """Check raw CT (a NIfTI file, or a DICOM folder / ``.zip``): every image series (or ``series``)."""
    from med3dvlm.data.ct import NIFTI_SUFFIXES, list_series, load_ct

    start = time.perf_counter()
    path = Path(path)
    report = CheckReport(path)
    if not path.exists():
        report.add("file", f"{path}: not found")
        return report
    if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        targets = [(None, path.name)]
    else:
        try:
            found = list_series(path)
        except DataError as exc:
            report.add("file", str(exc))
            return report
        targets = [(info.uid, info.line()) for info in found if series in (None, info.uid, info.number)]
        if not targets:
            report.add("file", f"{path}: no DICOM image series" + (f" matching series={series}" if series else ""))
    for uid, label in targets:
        report.files.append(label)
        try:
            volume, spacing = load_ct(path, series=uid)
        except DataError as exc:
            report.add("volume", str(exc))
            continue
        report.volumes += 1
        low, high = float(volume.min()), float(volume.max())
        size = " x ".join(map(str, volume.shape))
        mm = " x ".join(f"{s:.3g}" for s in spacing)
        note = "" if low < -500 else " (no air below -500: not CT in HU? an MRI, or stored values without rescale)"
        report.info.append(f"{label}: {size} voxels (D x H x W), spacing {mm} mm, values {low:.0f} to {high:.0f}{note}")
    report.seconds = time.perf_counter() - start
    return report


def _check_records(root: Path, volume_format: str | None, report: CheckReport, listed: dict[Path, list[str]]) -> None:
    """Read every layout file present; record problems and which entries/rows list each volume."""
    for path, read in _dataset_files(root, volume_format):
        relative = path.relative_to(root).as_posix()
        if not path.is_file():
            report.absent.append(relative)
            continue
        report.files.append(relative)
        try:
            result = read()
        except DataError as exc:
            report.add("file", str(exc))
            continue
        report.records += len(result.samples)
        for skipped in result.skipped:
            report.add("record", skipped.reason)
        for sample in result.samples:
            listed.setdefault(sample.image_path, []).append(sample.source)


@contextlib.contextmanager
def _quiet_reader_warnings():
    reader_log = logging.getLogger(read_cap_json.__module__)
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        reader_log.setLevel(level)


def _dataset_files(root: Path, volume_format: str | None):
    """(file, reader) for every split of every layout file; the reader yields a ``ReadResult``."""
    from med3dvlm.data.rad3d import is_rad3d_root, read_rad3d_csv

    for split in layout.CAP_SPLITS:
        yield root / layout.CAP_JSON, lambda split=split: read_cap_json(root, split, "skip", volume_format)
    if is_rad3d_root(root):  # a prepared CT-RATE root: 3D-RAD questions and the abnormality labels
        for split in layout.CAP_SPLITS:
            for path in sorted((root / ct_rate.RAD3D_DIR / split).glob("task*_*.csv")):
                yield path, lambda path=path: read_rad3d_csv(path, root, "skip", volume_format)
            yield ct_rate.labels_csv(root, split), lambda split=split: _read_labels(root, split)
        return
    for split in layout.CAP_SPLITS:
        path = root / layout.VQA_DIR / layout.VQA_CSV[split]
        # closed mode checks every column the open mode does, and the answer letter too
        yield path, lambda path=path: read_vqa_csv(path, root, "closed", "skip", volume_format)
    for split in layout.CAP_SPLITS:
        path = root / layout.VQA_DIR / layout.VQA_YN_CSV[split]
        yield path, lambda path=path: read_vqa_yes_no_csv(path, root, "skip", volume_format)


def _read_labels(root: Path, split: str) -> ReadResult:
    """The abnormality labels as a ``ReadResult`` (a caption-like sample per labelled volume)."""
    skipped: list[str] = []
    volumes = ct_rate.read_abnormality_labels(root, split, skipped=skipped)
    samples = [Sample(v.image_path, "", "", "caption", v.source) for v in volumes]
    return ReadResult(samples, [SkippedSample(reason.split(": ", 1)[0], reason) for reason in skipped])


def inspect_volume(job: VolumeJob) -> list[str]:
    """The problems of one volume file (empty when it is fine)."""
    listed = f"(listed by {job.listed_by}" + (f" and {job.listings - 1} more)" if job.listings > 1 else ")")
    try:
        volume = load_volume(job.path)
    except DataError as exc:
        return [f"{exc} {listed}"]
    problems = []
    if job.shape is not None and volume.shape != job.shape:
        problems.append(f"{job.path}: shape {volume.shape}, expected {job.shape} {listed}")
    if job.value_range is not None:
        low, high = float(volume.min()), float(volume.max())
        lower, upper = job.value_range
        if low < lower - RANGE_TOLERANCE or high > upper + RANGE_TOLERANCE:
            problems.append(f"{job.path}: values in [{low:.6g}, {high:.6g}], expected [{lower:g}, {upper:g}] {listed}")
    return problems


def _crashed(job: VolumeJob, error: BaseException) -> list[str]:
    return [f"{job.path}: the checking process died ({type(error).__name__}: {error})"]


def run_from_config(cfg: Any) -> CheckReport:
    """Run the check a ``configs/check.yaml`` config asks for; print the summary, save the report."""
    if cfg.get("ct"):
        report = check_ct(cfg["ct"], series=None if cfg.get("series") is None else str(cfg["series"]))
    elif not cfg.get("root"):
        raise ValueError("nothing to check: give root=DATASET_ROOT (a prepared dataset) or ct=PATH (raw CT)")
    else:
        report = _check_dataset_from_config(cfg)
    print(report.text(cfg.get("max_listed", 50)))
    if cfg.get("report_file"):
        write_atomic(Path(cfg["report_file"]), json_bytes(report.to_json(), indent=1))
    return report


def _check_dataset_from_config(cfg: Any) -> CheckReport:
    return check_dataset(
        cfg["root"],
        shape=None if cfg.get("shape") is None else tuple(cfg["shape"]),
        value_range=None if cfg.get("value_range") is None else tuple(cfg["value_range"]),
        volume_format=cfg.get("volume_format"),
        load_volumes=bool(cfg.get("load_volumes", True)),
        workers=cfg.get("workers"),
        progress=bool(cfg.get("progress", True)),
    )
