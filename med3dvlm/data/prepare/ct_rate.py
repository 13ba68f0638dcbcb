"""``python -m med3dvlm.prepare source=ct_rate``: CT-RATE (and 3D-RAD) as downloaded -> the M3D layout.

One case per CT-RATE volume (``<cases_dir>/<VolumeName stem>/<stem>.nii.gz``), prepared by the same
pipeline as every other source (``med3dvlm.data.prepare.pipeline``: resumable, parallel, atomic, a summary),
with the preprocessing every CT source gets (HU window, display orientation, crop, resize) and the
CT-RATE window by default. What is particular to CT-RATE (``med3dvlm.data.ct_rate`` has the formats):

* the CSVs are found by name anywhere under ``raw_dir``; volumes listed in a reports CSV but absent
  are counted, not fatal (users download parts of CT-RATE);
* voxels: stored values (rescaled with the metadata's slope and intercept) or HU, detected per volume
  and said in the summary; never rescaled twice;
* report = ``Findings_EN`` + ``Impressions_EN``;
* splits: ``train`` stays train; ``valid`` is cut by patient (a hash of the patient id) into validation
  and test (``test_fraction``), so a patient's scans always share one split;
* ``CT-RATE-labels/<split>.csv``: the 18 labels of the prepared volumes, with their prepared paths;
* ``3D-RAD/<split>/task<N>_{closed,open}.csv`` (with ``rad3d_dir``): the questions of the prepared
  volumes, each in its volume's split, with resolved paths and checked fields.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from med3dvlm.data import ct_rate, layout
from med3dvlm.data.m3d import fold_newlines
from med3dvlm.data.prepare.cases import CaseJob, SeriesSource, read_manifest
from med3dvlm.data.prepare.pipeline import Summary, check_folders, run_cases
from med3dvlm.data.prepare.settings import MANIFEST_NAME, PreparationError, PrepareSettings, SplitRule
from med3dvlm.utils import csv_bytes, json_bytes, write_atomic

# Ours, not CT-RATE's: the share of the released validation patients that becomes the test split.
DEFAULT_TEST_FRACTION = 0.5
# CT-CLIP's clip range on CT-RATE: lung parenchyma and mediastinum both visible (lung window: [-1350, 150]).
CT_RATE_HU_WINDOW = (-1000.0, 1000.0)
REPORTS_CSV = {"train": "train_reports.csv", "valid": "validation_reports.csv"}
METADATA_CSV = {"train": "train_metadata.csv", "valid": "validation_metadata.csv"}
LABELS_CSV = {"train": "train_predicted_labels.csv", "valid": "valid_predicted_labels.csv"}
SPLITS_FILE = "ct_rate_splits.json"  # written into out_dir: which split each case went to
_RAD3D_TASK = re.compile(r"task[ _-]?([1-6])", re.IGNORECASE)


def _find_csv(raw_dir: Path, name: str) -> Path | None:
    found = sorted(raw_dir.rglob(name))
    if len(found) > 1:
        raise PreparationError(f"raw_dir {raw_dir}: {name} found {len(found)} times ({found[0]}, {found[1]}); keep one")
    return found[0] if found else None


def _rows(path: Path, required: Iterable[str]) -> Iterable[tuple[int, dict[str, str]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = csv.DictReader(handle)
            missing = [c for c in required if c not in (rows.fieldnames or [])]
            if missing:
                raise PreparationError(f"{path}: row 1 (header) lacks column(s) {missing}")
            for number, row in enumerate(rows, start=2):
                yield number, {key: (value or "").strip() for key, value in row.items() if key is not None}
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise PreparationError(f"{path}: unreadable CSV ({exc})") from exc


def read_reports(path: Path) -> tuple[dict[str, str], list[str]]:
    """``{VolumeName: findings + impressions}`` and the rows left out (empty report), named by row."""
    reports, problems = {}, []
    for number, row in _rows(path, ("VolumeName", "Findings_EN", "Impressions_EN")):
        text = fold_newlines(" ".join(part for part in (row["Findings_EN"], row["Impressions_EN"]) if part))
        if not text:
            problems.append(
                f"{path}: row {number}: {row['VolumeName']} has empty Findings_EN and Impressions_EN; left out"
            )
            continue
        ct_rate.patient_of(row["VolumeName"])  # a malformed name fails here, with the row
        reports[row["VolumeName"]] = text
    return reports, problems


def read_metadata(path: Path) -> dict[str, tuple[float, float]]:
    """``{VolumeName: (RescaleSlope, RescaleIntercept)}``."""
    rescale = {}
    for number, row in _rows(path, ("VolumeName", "RescaleSlope", "RescaleIntercept")):
        try:
            rescale[row["VolumeName"]] = (float(row["RescaleSlope"]), float(row["RescaleIntercept"]))
        except ValueError:
            raise PreparationError(
                f"{path}: row {number}: RescaleSlope {row['RescaleSlope']!r} / RescaleIntercept "
                f"{row['RescaleIntercept']!r} are not numbers"
            ) from None
    return rescale


def read_label_rows(path: Path) -> dict[str, dict[str, int]]:
    labels = {}
    for number, row in _rows(path, ("VolumeName", *ct_rate.ABNORMALITY_LABELS)):
        values = {}
        for label in ct_rate.ABNORMALITY_LABELS:
            if row[label] not in ("0", "1", "0.0", "1.0"):
                raise PreparationError(f"{path}: row {number}: {label!r} is {row[label]!r}; expected 0 or 1")
            values[label] = int(float(row[label]))
        labels[row["VolumeName"]] = values
    return labels


def split_of(volume_name: str, test_fraction: float, seed: int) -> str:
    """``train`` for CT-RATE's train volumes; validation or test for ``valid`` ones, by patient."""
    patient = ct_rate.patient_of(volume_name)
    if patient.startswith("train_"):
        return "train"
    digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "validation"


def _stem(volume_name: str) -> str:
    return Path(volume_name).name.removesuffix(".gz").removesuffix(".nii")


def prepare_ct_rate(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: PrepareSettings,
    rad3d_dir: str | os.PathLike | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    storage: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Summary:
    """Prepare the CT-RATE volumes under ``raw_dir`` (module docstring) into ``out_dir``; resumable."""
    start = time.perf_counter()
    if not 0.0 <= float(test_fraction) <= 1.0:
        raise PreparationError(f"ct_rate.test_fraction must lie in [0, 1], got {test_fraction}")
    if storage not in ct_rate.STORAGE_MODES:
        raise PreparationError(f"ct_rate.storage must be one of {ct_rate.STORAGE_MODES}, got {storage!r}")
    raw_dir, out_root = check_folders(raw_dir, out_dir, settings, overwrite)
    summary = Summary(f"prepare CT-RATE {raw_dir} -> {out_root}")
    reports: dict[str, str] = {}
    rescale: dict[str, tuple[float, float]] = {}
    labels: dict[str, dict[str, int]] = {}
    for release_split in ("train", "valid"):
        path = _find_csv(raw_dir, REPORTS_CSV[release_split])
        if path is None:
            summary.notes.append(f"{REPORTS_CSV[release_split]}: not found under {raw_dir}; its volumes are left out")
            continue
        found, problems = read_reports(path)
        reports.update(found)
        summary.problems += problems
        metadata = _find_csv(raw_dir, METADATA_CSV[release_split])
        rescale.update(read_metadata(metadata) if metadata else {})
        label_file = _find_csv(raw_dir, LABELS_CSV[release_split])
        labels.update(read_label_rows(label_file) if label_file else {})
    if not reports:
        raise PreparationError(f"raw_dir {raw_dir} holds no CT-RATE reports CSV ({', '.join(REPORTS_CSV.values())})")
    on_disk = {path.name: path for path in raw_dir.rglob("*.nii.gz")}
    jobs, splits = [], {name: [] for name in layout.CAP_SPLITS}
    absent = [name for name in reports if name not in on_disk]
    for name in sorted(reports):
        if name not in on_disk:
            continue
        stem = _stem(name)
        series = SeriesSource(stem, stem, on_disk[name], "ct_rate", rescale=rescale.get(name), storage=storage)
        key = f"{settings.cases_dir}/{stem}"
        jobs.append(CaseJob(key, on_disk[name], on_disk[name].with_suffix(".txt"), (series,), out_root, settings,
                            report_text=reports[name]))  # fmt: skip
        splits[split_of(name, test_fraction, seed)].append(key)
    if absent:
        summary.notes.append(f"{len(absent)} volume(s) listed in the reports but not under raw_dir (e.g. {absent[0]})")
    if not jobs:
        raise PreparationError(f"raw_dir {raw_dir}: none of the {len(reports)} volumes the reports list is there")
    split_file = write_atomic(out_root / SPLITS_FILE, json_bytes(splits, indent=1, ensure_ascii=True))
    run_cases(jobs, out_root, settings, SplitRule(file=str(split_file)), summary, workers, progress)
    storage_found = Counter(
        "in HU" if "stored in HU" in note else "as stored values (rescaled)"
        for r in summary.results for note in r.notes if "stored" in note
    )  # fmt: skip
    if storage_found:
        summary.outputs.append(
            "voxels as found: " + ", ".join(f"{n} {kind}" for kind, n in sorted(storage_found.items()))
        )
    prepared = _prepared_images(out_root, jobs)
    split_by_key = {key: name for name, keys in splits.items() for key in keys}
    summary.outputs += _write_labels(out_root, prepared, split_by_key, labels)
    if rad3d_dir is not None:
        written, problems = _write_rad3d(Path(rad3d_dir), out_root, prepared, split_by_key)
        summary.outputs += written
        summary.problems += problems
    summary.seconds = time.perf_counter() - start
    return summary


def _prepared_images(out_root: Path, jobs: list[CaseJob]) -> dict[str, tuple[str, str]]:
    """``{VolumeName: (case key, prepared image path)}`` of every case whose manifest is complete."""
    images = {}
    for job in jobs:
        manifest = read_manifest(job.out_dir / MANIFEST_NAME)
        if manifest and manifest.get("series") and (out_root / manifest["series"][0]["image"]).is_file():
            images[job.source.name] = (job.key, manifest["series"][0]["image"])
    return images


def _write_labels(
    out_root: Path, prepared: Mapping[str, tuple[str, str]], split_by_key: Mapping[str, str], labels: Mapping
) -> list[str]:
    rows: dict[str, list[list[object]]] = {name: [] for name in layout.CAP_SPLITS}
    for name, (key, image) in sorted(prepared.items()):
        if name in labels:
            rows[split_by_key[key]].append(
                [image, name, *(labels[name][label] for label in ct_rate.ABNORMALITY_LABELS)]
            )
    if not any(rows.values()):
        return ["abnormality labels: no labels CSV found or none of its volumes prepared; CT-RATE-labels/ not written"]
    columns = (*ct_rate.LABEL_KEY_COLUMNS, *ct_rate.ABNORMALITY_LABELS)
    for split, split_rows in rows.items():
        write_atomic(ct_rate.labels_csv(out_root, split), csv_bytes(columns, split_rows))
    missing = len(prepared) - sum(len(r) for r in rows.values())
    counts = ", ".join(f"{split} {len(r)}" for split, r in rows.items())
    return [
        f"{out_root / ct_rate.LABELS_DIR}: labels of {counts} volumes"
        + (f"; {missing} prepared without labels" if missing else "")
    ]


def _write_rad3d(
    rad3d_dir: Path, out_root: Path, prepared: Mapping[str, tuple[str, str]], split_by_key: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """Every 3D-RAD task CSV under ``rad3d_dir`` -> ``3D-RAD/<split>/task<N>_<kind>.csv`` of the prepared volumes."""
    if not rad3d_dir.is_dir():
        raise PreparationError(f"rad3d_dir {rad3d_dir} is not a folder")
    sources = [p for p in sorted(rad3d_dir.rglob("*.csv")) if _RAD3D_TASK.search(p.name)]
    if not sources:
        return [], [f"rad3d_dir {rad3d_dir}: no task<N> CSV found (3D-RAD's files are named task1 ... task6)"]
    out: dict[tuple[str, int, str], list[list[str]]] = {}
    problems, absent = [], 0
    for source in sources:
        task = int(_RAD3D_TASK.search(source.name).group(1))
        header = next(csv.reader(io.StringIO(source.read_text(encoding="utf-8-sig"))), [])
        kind = "closed" if "AnswerChoice" in [h.strip() for h in header] else "open"
        required = ["VolumeName", "Question", "Answer"] + (
            ["Choice A", "Choice B", "AnswerChoice"] if kind == "closed" else []
        )
        for number, row in _rows(source, required):
            where = f"{source}: row {number}"
            if row["VolumeName"] not in prepared:
                absent += 1
                continue
            problem = _rad3d_row_problem(row, kind, where)
            if problem:
                problems.append(problem + "; left out")
                continue
            key, image = prepared[row["VolumeName"]]
            choices = [row.get(f"Choice {letter}", "") for letter in layout.ANSWER_LETTERS]
            out.setdefault((split_by_key[key], task, kind), []).append(
                [image, row["VolumeName"], ct_rate.RAD3D_TASKS[task], row.get("QuestionAspect", ""), row["Question"],
                 row["Answer"], *choices, row.get("AnswerChoice", "").upper() if kind == "closed" else ""]
            )  # fmt: skip
    per_split: Counter = Counter()
    for (split, task, kind), rows in sorted(out.items()):
        write_atomic(ct_rate.rad3d_csv(out_root, split, task, kind), csv_bytes(ct_rate.RAD3D_COLUMNS, rows))
        per_split[split] += len(rows)
    counts = ", ".join(f"{split} {per_split[split]}" for split in layout.CAP_SPLITS)
    written = [f"{out_root / ct_rate.RAD3D_DIR}: questions from {len(sources)} task CSVs: {counts}"]
    if absent:
        written.append(f"3D-RAD: {absent} questions about volumes not prepared here, left out")
    return written, problems


def _rad3d_row_problem(row: Mapping[str, str], kind: str, where: str) -> str | None:
    if not row["Question"] or not row["Answer"]:
        return f"{where}: empty {'Question' if not row['Question'] else 'Answer'}"
    if kind == "open":
        return None
    letters = [letter for letter in layout.ANSWER_LETTERS if row.get(f"Choice {letter}")]
    if letters not in (["A", "B"], ["A", "B", "C", "D"]):
        return f"{where}: choices {letters}; a closed question has A-B or A-D"
    if row["AnswerChoice"].upper() not in letters:
        return f"{where}: AnswerChoice {row['AnswerChoice']!r} is not one of {letters}"
    return None
