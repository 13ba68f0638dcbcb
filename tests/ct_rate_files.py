"""A small CT-RATE download (and 3D-RAD), written from phantoms in HU in both CT-RATE storage versions.

Layout and columns as the public releases (``med3dvlm.data.ct_rate``): volumes under
``dataset/{train,valid}/<split>_<patient>/<split>_<patient>_<scan>/``, reports / metadata / labels CSVs
in their own folders, 3D-RAD task CSVs. ``storage="stored"`` writes int16 stored values (HU + 1024,
intercept -1024 in the metadata, as the first release), ``storage="hu"`` writes HU (the second).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ct_files import phantom_hu

from med3dvlm.data.ct_rate import ABNORMALITY_LABELS, RAD3D_TASKS

# patient -> volumes (scan letter, reconstruction); two reconstructions of one scan share a report
PATIENTS = {
    "train_1": [("a", 1), ("a", 2)],
    "train_2": [("a", 1)],
    "train_3": [("a", 1), ("b", 1)],
    "train_4": [("a", 1)],
    "train_5": [("a", 1)],
    "train_6": [("a", 1)],
    "valid_1": [("a", 1), ("a", 2)],
    "valid_2": [("a", 1)],
    "valid_3": [("a", 1)],
    "valid_4": [("a", 1), ("b", 1)],
    "valid_5": [("a", 1)],
    "valid_6": [("a", 1)],
}
SHAPE = (16, 32, 32)
STORED_INTERCEPT = -1024.0


@dataclass(frozen=True)
class CTRateTree:
    root: Path  # what the user gives as raw_dir
    rad3d: Path
    volumes: dict[str, np.ndarray]  # VolumeName -> HU (D, H, W), display order
    labels: dict[str, dict[str, int]]


def volume_names() -> list[str]:
    return [f"{p}_{scan}_{recon}.nii.gz" for p, scans in PATIENTS.items() for scan, recon in scans]


def write_ct_rate_tree(base: Path, phantom_root: Path, storage: str, missing: tuple[str, ...] = ()) -> CTRateTree:
    """The tree under ``base``; ``missing`` volumes are listed in the CSVs but not written (a partial download)."""
    import nibabel as nib

    from med3dvlm.data import make_phantom_dataset
    from med3dvlm.data.volumes import load_volume

    names = volume_names()
    phantoms = make_phantom_dataset(phantom_root, num_cases=len(names), shape=SHAPE, seed=3)
    cap = json.loads((phantoms.root / "M3D_Cap.json").read_text())
    entries = [e for split in ("train", "validation", "test") for e in cap[split]]
    dataset = base / "dataset"
    rng = np.random.default_rng(0)
    volumes, labels, reports, metadata = {}, {}, [], []
    for name, entry in zip(names, entries):
        hu = phantom_hu(load_volume(phantoms.root / entry["image"]))
        volumes[name] = hu
        stem = name.removesuffix(".nii.gz")
        split, patient, scan, _ = stem.split("_")
        folder = dataset / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}"
        folder.mkdir(parents=True, exist_ok=True)
        stored = hu - STORED_INTERCEPT if storage == "stored" else hu
        # display (D, H, W) = (I, P, L) -> file (x, y, z) = (L, P, I): affine with those directions
        affine = np.diag([-0.75, -0.75, -1.5, 1.0])
        if name not in missing:
            nib.save(
                nib.Nifti1Image(np.ascontiguousarray(stored.transpose(2, 1, 0)).astype(np.int16), affine), folder / name
            )
        report = (phantoms.root / entry["text"]).read_text().strip()
        reports.append([name, "Chest pain.", "Non-contrast chest CT.", report, "No acute findings."])
        metadata.append([name, "1", str(STORED_INTERCEPT), "[0.75, 0.75]", "1.5"])
        labels[name] = {label: int(rng.random() < 0.4) for label in ABNORMALITY_LABELS}
    _csv(dataset / "radiology_text_reports" / "train_reports.csv",
         ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
         [r for r in reports if r[0].startswith("train")])  # fmt: skip
    _csv(dataset / "radiology_text_reports" / "validation_reports.csv",
         ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
         [r for r in reports if r[0].startswith("valid")])  # fmt: skip
    meta_columns = ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"]
    _csv(dataset / "metadata" / "train_metadata.csv", meta_columns, [m for m in metadata if m[0].startswith("train")])
    _csv(
        dataset / "metadata" / "validation_metadata.csv",
        meta_columns,
        [m for m in metadata if m[0].startswith("valid")],
    )
    label_rows = [[name, *(labels[name][label] for label in ABNORMALITY_LABELS)] for name in names]
    for split, file in (("train", "train_predicted_labels.csv"), ("valid", "valid_predicted_labels.csv")):
        _csv(dataset / "multi_abnormality_labels" / file, ["VolumeName", *ABNORMALITY_LABELS],
             [row for row in label_rows if row[0].startswith(split)])  # fmt: skip
    rad3d = write_rad3d(base / "3D-RAD", names)
    return CTRateTree(base, rad3d, volumes, labels)


def write_rad3d(folder: Path, names: list[str]) -> Path:
    """Per task: a closed CSV (two choices for tasks 1 and 4, four otherwise) and an open CSV."""
    closed_columns = ["VolumeName", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer",
                      "AnswerChoice", "QuestionAspect"]  # fmt: skip
    for task, title in RAD3D_TASKS.items():
        closed, open_ = [], []
        for index, name in enumerate(names):
            if task in (1, 4):
                answer, letter = ("Yes", "A") if index % 2 == 0 else ("No", "B")
                closed.append(
                    [name, f"Is there an abnormality ({title})?", "Yes", "No", "", "", answer, letter, "presence"]
                )
            else:
                letter = "ABCD"[index % 4]
                choices = ["left lobe", "right lobe", "both lobes", "none"]
                closed.append(
                    [name, f"Where is it ({title})?", *choices, choices["ABCD".index(letter)], letter, "location"]
                )
            open_.append([name, f"Describe the {title.lower()}.", f"Finding {index % 3}.", "finding"])
        split = "test" if task % 2 else "train"  # 3D-RAD ships its own split folders; prepare re-splits by volume
        _csv(folder / split / f"task{task}_closed.csv", closed_columns, closed)
        _csv(folder / split / f"task{task}_open.csv", ["VolumeName", "Question", "Answer", "QuestionAspect"], open_)
    return folder


def _csv(path: Path, columns: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
