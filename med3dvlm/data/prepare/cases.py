"""One case: where its series come from (``SeriesSource``, ``CaseJob``), preparing it in a worker
(``prepare_case``: read each series, the one recorded preprocessing, the volumes, the report, the
manifest last), and whether an earlier run already did (``is_prepared``)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from med3dvlm.data.ct import load_ct
from med3dvlm.data.errors import DataError
from med3dvlm.data.prepare.settings import (
    FOLDER_LAYOUT_VOLUME,
    MANIFEST_NAME,
    REPORT_NAME,
    CaseError,
    PrepareSettings,
    extract_report,
)
from med3dvlm.data.prepare.slices import read_slice_series
from med3dvlm.data.volumes import save_volume
from med3dvlm.utils import json_bytes, remove_temporary_files, write_atomic


@dataclass(frozen=True)
class SeriesSource:
    raw_name: str  # as on disk (DICOM: "<SeriesNumber>_<SeriesDescription>")
    name: str  # ASCII, unique within the case
    path: Path  # slice folder, NIfTI file, or the study folder holding a DICOM series
    kind: str  # "slices", "nifti", "dicom" or "ct_rate": which reader (``_series_volume``)
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
    write_atomic(job.out_dir / MANIFEST_NAME, json_bytes(manifest, indent=1))
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
        volume, note = read_slice_series(series.path)
    elif series.kind == "ct_rate":
        from med3dvlm.data.ct_rate import read_ct_rate_volume

        volume, note = read_ct_rate_volume(series.path, series.rescale, series.storage or "auto", settings.reorient)
    else:
        volume = load_ct(series.path, series=series.series_uid, reorient=settings.reorient).volume
    return settings.preprocessing(series.kind).apply(volume, where), note
