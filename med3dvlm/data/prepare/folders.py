"""``source=folders``: a raw folder of cases, each a folder of series (slice folders, NIfTI files, a DICOM
study) with its report, or a NIfTI volume directly in the raw folder (its report ``<name>.txt`` beside it)."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from collections.abc import Mapping
from pathlib import Path

from med3dvlm.data.errors import DataError
from med3dvlm.data.m3d import fold_newlines
from med3dvlm.data.prepare.cases import CaseJob, CaseResult, SeriesSource
from med3dvlm.data.prepare.dicom import dicom_series, holds_dicom, is_dicom_file
from med3dvlm.data.prepare.nifti import loose_volume_case, nifti_stem
from med3dvlm.data.prepare.pipeline import Summary, check_folders, run_cases
from med3dvlm.data.prepare.settings import (
    PreparationError,
    PrepareSettings,
    SplitRule,
    ascii_name,
    read_split_file,
    unique_names,
)
from med3dvlm.data.prepare.slices import holds_slices
from med3dvlm.data.prepare.vqa import rewrite_vqa_csvs


def prepare_dataset(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: PrepareSettings | None = None,
    split: SplitRule | None = None,
    vqa_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    reports_csv: str | os.PathLike | None = None,
) -> Summary:
    """Prepare every case of ``raw_dir`` into ``out_dir`` (package docstring); resumable.

    ``settings`` and ``split``: the defaults when None. ``reports_csv``: a ``case,report`` CSV giving
    the report of each case folder (else its report file)."""
    start = time.perf_counter()
    settings = PrepareSettings() if settings is None else settings
    split = SplitRule() if split is None else split
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


def find_cases(
    raw_dir: Path, out_root: Path, settings: PrepareSettings, reports: Mapping[str, str] | None = None
) -> tuple[list[CaseJob], list[CaseResult], list[str]]:
    """Every case under ``raw_dir``; cases that cannot be prepared (failed); entries ignored, with why.

    ``reports``: case folder name -> report text (a reports CSV), used instead of the report file."""
    entries = sorted(entry for entry in raw_dir.iterdir() if not entry.name.startswith("."))
    stems = {entry.name: nifti_stem(entry.name) for entry in entries if entry.is_file()}
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
            jobs.append(loose_volume_case(entry, raw_id, key, out_root, settings))
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
        if entry.is_dir() and (holds_slices(entry) or not holds_dicom(entry)):
            sources.append((entry.name, entry, "slices", None))  # an empty folder fails as a slice series
        elif entry.is_dir() or is_dicom_file(entry):
            dicom_study = True
        elif nifti_stem(entry.name):
            sources.append((nifti_stem(entry.name), entry, "nifti", None))
        else:
            notes.append(
                f"{entry}: ignored (neither a series folder, a NIfTI volume, DICOM nor {settings.report_file})"
            )
    if dicom_study:
        for raw_name, uid in dicom_series(folder, exclude=[path for _, path, _, _ in sources]):
            sources.append((raw_name, folder, "dicom", uid))
    names = unique_names([raw for raw, _, _, _ in sources], fallback="series")
    series = tuple(SeriesSource(raw, name, path, kind, uid) for (raw, path, kind, uid), name in zip(sources, names))
    return CaseJob(key, folder, report, series, out_root, settings, tuple(notes))


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
