"""CT-RATE (chest CT, reports, 18 abnormality labels) and 3D-RAD (VQA on CT-RATE): the files as
released, and the files ``prepare source=ct_rate`` writes for the readers.

As downloaded (users often have part of it; CSVs are found by name anywhere under the root)::

    dataset/train/train_1/train_1_a/train_1_a_1.nii.gz       <split>_<patient>_<scan>_<reconstruction>
    dataset/radiology_text_reports/{train,validation}_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    dataset/metadata/{train,validation}_metadata.csv          VolumeName, RescaleSlope, RescaleIntercept,
                                                              XYSpacing ("[0.75, 0.75]"), ZSpacing, ...
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + 18 binary columns

The first release stores raw stored values (slope and intercept in the metadata); the second stores
HU. 3D-RAD: per-task CSVs (``task1`` .. ``task6``) with ``VolumeName, Question, Answer``, closed ones
with ``Choice A, Choice B[, Choice C, Choice D], AnswerChoice``, and ``QuestionAspect``.

Prepared (under the dataset root, beside ``M3D_Cap.json``)::

    CT-RATE-labels/{train,validation,test}.csv   Image Path, VolumeName, <the 18 labels as 0/1>
    3D-RAD/{train,validation,test}/task<N>_{closed,open}.csv
        Image Path, VolumeName, Task, QuestionAspect, Question, Answer, Choice A..D, AnswerChoice
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.errors import CorruptFileError, InvalidRecordError, MissingColumnsError, MissingFileError

# The 18 abnormality labels of CT-RATE's multi_abnormality_labels CSVs, in their column order.
ABNORMALITY_LABELS = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
LABELS_DIR = "CT-RATE-labels"
LABEL_KEY_COLUMNS = ("Image Path", "VolumeName")
RAD3D_TASKS = layout.RAD3D_TASKS  # 3D-RAD's six tasks (task1 .. task6), the names its tables use
RAD3D_DIR = "3D-RAD"
RAD3D_COLUMNS = (
    "Image Path", "VolumeName", "Task", "QuestionAspect", "Question", "Answer",
    "Choice A", "Choice B", "Choice C", "Choice D", "AnswerChoice",
)  # fmt: skip
# How a CT-RATE volume stores its voxels: the first release raw stored values (slope and intercept in
# the metadata CSV), the second HU. "auto" tells them apart by air: in HU, air lies near -1000, and a
# chest CT has far more than AIR_FRACTION_FOR_HU of its voxels there; stored values (HU + 1024 for
# the usual intercept) have none in that range.
STORAGE_MODES = ("auto", "stored", "hu")
AIR_HU_RANGE = (-1200.0, -500.0)
AIR_FRACTION_FOR_HU = 0.05
# VolumeName: <split>_<patient>_<scan letter>_<reconstruction>.nii.gz
VOLUME_NAME = re.compile(r"(?P<split>train|valid)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<reconstruction>\d+)")


def labels_csv(root: str | os.PathLike, split: str) -> Path:
    if split not in layout.CAP_SPLITS:
        raise ValueError(f"split must be one of {layout.CAP_SPLITS}, got {split!r}")
    return Path(root) / LABELS_DIR / f"{split}.csv"


def rad3d_csv(root: str | os.PathLike, split: str, task: int, kind: str) -> Path:
    return Path(root) / RAD3D_DIR / split / f"task{task}_{kind}.csv"


def patient_of(volume_name: str) -> str:
    """``train_12_a_1.nii.gz`` -> ``train_12``: the unit a split must never cut."""
    match = VOLUME_NAME.match(Path(volume_name).name)
    if match is None:
        raise InvalidRecordError(
            f"VolumeName {volume_name!r} is not <split>_<patient>_<scan>_<reconstruction>.nii.gz as CT-RATE names volumes"
        )
    return f"{match['split']}_{match['patient']}"


@dataclass(frozen=True)
class LabelledVolume:
    """One prepared volume with its 18 abnormality labels (1 present, 0 absent)."""

    image_path: Path
    volume_name: str
    labels: dict[str, int]
    source: str  # "test.csv:row 7"


def read_abnormality_labels(
    root: str | os.PathLike,
    split: str,
    labels: Sequence[str] = ABNORMALITY_LABELS,
    skipped: list[str] | None = None,
) -> list[LabelledVolume]:
    """The labelled volumes of ``split`` from ``CT-RATE-labels/<split>.csv``; errors name the file and row.

    With a ``skipped`` list, a bad row is left out and its reason appended there instead of raised."""
    from med3dvlm.data.errors import DataError

    root = Path(root)
    path = labels_csv(root, split)
    if not path.is_file():
        raise MissingFileError(f"{path}: labels file not found (written by python -m med3dvlm.prepare source=ct_rate)")
    volumes = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = csv.DictReader(handle)
            missing = [c for c in (*LABEL_KEY_COLUMNS, *labels) if c not in (rows.fieldnames or [])]
            if missing:
                raise MissingColumnsError(f"{path}: row 1 (header) lacks column(s) {missing}")
            for number, row in enumerate(rows, start=2):
                try:
                    volumes.append(_labelled_volume(root, row, labels, f"{path}: row {number}", f"{path.name}:row {number}"))
                except DataError as exc:
                    if skipped is None:
                        raise
                    skipped.append(str(exc))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: malformed CSV ({exc})") from exc
    return volumes


def _labelled_volume(root: Path, row: dict, labels: Sequence[str], where: str, source: str) -> LabelledVolume:
    from med3dvlm.data.m3d import resolve_in_root

    values = {}
    for label in labels:
        text = (row[label] or "").strip()
        if text not in ("0", "1", "0.0", "1.0"):
            raise InvalidRecordError(f"{where}: {label!r} is {row[label]!r}; expected 0 or 1")
        values[label] = int(float(text))
    image = resolve_in_root(root, row["Image Path"] or "", where, "image")
    if not image.is_file():
        raise MissingFileError(f"{where}: volume {image} not found")
    return LabelledVolume(image, row["VolumeName"], values, source)


def detect_storage(volume) -> str:
    """``"hu"`` or ``"stored"`` (see ``STORAGE_MODES``)."""
    import numpy as np

    lower, upper = AIR_HU_RANGE
    air = float(np.count_nonzero((volume >= lower) & (volume <= upper))) / max(1, volume.size)
    return "hu" if air >= AIR_FRACTION_FOR_HU else "stored"


def read_ct_rate_volume(
    path: Path, rescale: tuple[float, float] | None, storage: str = "auto", reorient: bool = True
):
    """A CT-RATE volume in HU, ``(D, H, W)``, and a note saying how it was stored; never rescaled twice."""
    from med3dvlm.data.ct import load_ct
    from med3dvlm.data.errors import DataError

    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
    volume = load_ct(path, reorient=reorient).volume
    found = detect_storage(volume) if storage == "auto" else storage
    if found == "hu":
        return volume, "stored in HU (used as is)"
    if rescale is None:
        raise DataError(f"{path}: holds stored values (no air near -1000 HU) but the metadata CSV gives no "
                        "RescaleSlope/RescaleIntercept for it; add its metadata row or set ct_rate.storage=hu")
    slope, intercept = rescale
    return volume * float(slope) + float(intercept), f"stored values, rescaled to HU (slope {slope:g}, intercept {intercept:g})"
