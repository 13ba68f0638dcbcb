"""The pipeline every source runs its cases through: claim the output folder, prepare what is not
done yet on every core, record the preprocessing, list the cases in ``M3D_Cap.json`` by split, and
say what happened in a ``Summary``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med3dvlm.data import layout
from med3dvlm.data.prepare.cases import CaseJob, CaseResult, is_prepared, prepare_case, read_manifest
from med3dvlm.data.prepare.settings import (
    MANIFEST_NAME,
    MAX_NOTES_PRINTED,
    PREPARATION_VERSION,
    ROOT_MARKER,
    PreparationError,
    PrepareSettings,
    SplitRule,
    assign_split,
    read_split_file,
)
from med3dvlm.data.preprocessing import Preprocessing, write_preprocessing
from med3dvlm.utils import available_cores, json_bytes, run_jobs, write_atomic


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
    summary.outputs.append(
        f"{out_root / 'preprocessing.json'}: {record.describe()} (applied to raw input at inference)"
    )
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
    write_atomic(marker, json_bytes({"generator": "med3dvlm.prepare", "version": PREPARATION_VERSION}, indent=1))


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
    write_atomic(out_root / layout.CAP_JSON, json_bytes(cap, indent=1))
    return {name: len(entries) for name, entries in cap.items()}, problems, without_report
