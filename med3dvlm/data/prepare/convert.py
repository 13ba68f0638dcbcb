"""``convert=ROOT``: give every volume a prepared dataset lists its copies in other formats (e.g. the
fast ``.nii`` beside each ``.nii.gz``, or NIfTI beside M3D's released ``.npy``)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.errors import DataError
from med3dvlm.data.tasks import read_task_split
from med3dvlm.data.prepare.cases import CaseResult
from med3dvlm.data.prepare.pipeline import Summary
from med3dvlm.data.prepare.settings import PreparationError, PrepareSettings
from med3dvlm.data.volumes import FAST_VOLUME_FORMAT, load_volume, save_volume, with_volume_format
from med3dvlm.utils import available_cores, run_jobs


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
