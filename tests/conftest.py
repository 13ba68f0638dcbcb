"""Shared fixtures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from med3dvlm.data import layout
from med3dvlm.data.volumes import save_volume

TINY_VOLUME_SHAPE = (8, 16, 16)  # (D, H, W); H == W so the 90-degree rotation keeps the shape
TINY_SPLIT_CASES = {"train": [0, 1, 2, 3], "validation": [4, 5], "test": [6, 7]}


@pytest.fixture
def tiny_m3d_root(tmp_path: Path) -> Path:
    """A valid M3D-layout root: 8 cases of 8x16x16, Cap JSON, VQA and yes/no CSVs for each split.

    Case i: ``volumes/case{i}.nii.gz`` (case 1 as ``.npy``), report ``reports/case{i}.txt`` =
    ``"Findings for case {i}.\\n  Liver normal.\\n\\n"``. Each VQA CSV holds two rows per case:
    a plane question (type ``1``, answer A. Axial) and an organ question (type ``Organ``,
    answer B. Kidney). Each yes/no CSV holds one row per case: answer ``yes`` for even i, ``NO`` odd.
    """
    root = tmp_path / "m3d"
    rng = np.random.default_rng(0)
    cap: dict[str, list[dict[str, str]]] = {}
    for split, cases in TINY_SPLIT_CASES.items():
        cap[split] = []
        vqa_rows, yes_no_rows = [], []
        for case in cases:
            image = f"volumes/case{case}.{'npy' if case == 1 else 'nii.gz'}"
            save_volume(rng.random(TINY_VOLUME_SHAPE, dtype=np.float32), root / image)
            report = root / f"reports/case{case}.txt"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(f"Findings for case {case}.\n  Liver normal.\n\n", encoding="utf-8")
            cap[split].append({"image": image, "text": f"reports/case{case}.txt"})
            plane = ["1", "What plane is this?", "Axial", "Coronal", "Sagittal", "Oblique", "Axial", "A"]
            organ = ["Organ", "Which organ is abnormal?", "Liver", "Kidney", "Spleen", "Lung", "Kidney", "B"]
            vqa_rows += [[image, "report", *plane], [image, "report", *organ]]
            yes_no_rows.append([image, "report", "4", "Is there a lesion?", "yes" if case % 2 == 0 else "NO"])
        write_csv(root / layout.VQA_DIR / layout.VQA_CSV[split], layout.VQA_COLUMNS, vqa_rows)
        write_csv(root / layout.VQA_DIR / layout.VQA_YN_CSV[split], layout.VQA_YN_COLUMNS, yes_no_rows)
    (root / layout.CAP_JSON).write_text(json.dumps(cap), encoding="utf-8")
    return root


def write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


@pytest.fixture
def csv_writer():
    """``write_csv(path, columns, rows)`` for tests that hand-write a CSV."""
    return write_csv


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny exported VLM and stage-1 models plus phantom volumes (``tests/tiny_models.py``), built once."""
    from tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
