"""The dataset checker finds every planted problem, names its file and row, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from med3dvlm.data import layout, save_volume
from med3dvlm.data.check import check_dataset

SHAPE = (6, 8, 8)
GOOD_ROW = ["v/good.nii.gz", "report", "1", "What plane?", "Axial", "Coronal", "Sagittal", "Oblique", "Axial", "A"]


def write_csv(path: Path, columns, rows) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.name


def with_value(row: list[str], column: str, value: str) -> list[str]:
    changed = list(row)
    changed[layout.VQA_COLUMNS.index(column)] = value
    return changed


@pytest.fixture
def broken_root(tmp_path: Path) -> tuple[Path, list[tuple[str, list[str]]]]:
    """A dataset with one good sample per file and the planted problems; returns (root, planted).

    ``planted`` lists (kind, fragments): each planted problem must be reported by a message of
    that kind holding every fragment (the file and the entry/row among them).
    """
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    save_volume(rng.random(SHAPE, dtype=np.float32), root / "v/good.nii.gz")
    save_volume(rng.random((4, 8, 8), dtype=np.float32), root / "v/small.nii.gz")
    save_volume(rng.random(SHAPE, dtype=np.float32) * 2, root / "v/hot.nii.gz")
    nan = rng.random(SHAPE, dtype=np.float32)
    nan[0, 0, 0] = np.nan
    save_volume(nan, root / "v/nan.npy")
    (root / "v/corrupt.nii.gz").write_bytes(rng.bytes(500))
    write(root / "r/good.txt", "Liver normal.")
    write(root / "r/empty.txt", "  \n\n")
    (tmp_path / "outside.nii.gz").write_bytes((root / "v/good.nii.gz").read_bytes())  # exists, but outside
    cap = "M3D_Cap.json"
    entries = [
        {"image": "v/good.nii.gz", "text": "r/good.txt"},
        {"image": "v/missing.nii.gz", "text": "r/good.txt"},
        {"image": "v/corrupt.nii.gz", "text": "r/good.txt"},
        {"image": "v/small.nii.gz", "text": "r/good.txt"},
        {"image": "v/hot.nii.gz", "text": "r/good.txt"},
        {"image": "v/nan.npy", "text": "r/good.txt"},
        {"image": "v/good.nii.gz", "text": "r/empty.txt"},
        {"image": "v/good.nii.gz", "text": "r/absent.txt"},
        {"image": "../outside.nii.gz", "text": "r/good.txt"},
        {"image": str(root / "v/good.nii.gz"), "text": "r/good.txt"},
        {"image": "v/good.nii.gz"},
    ]
    # the test split is missing from the JSON
    (root / cap).write_text(json.dumps({"train": entries, "validation": entries[:1]}), encoding="utf-8")
    closed = layout.VQA_DIR + "/" + layout.VQA_CSV["train"]
    write_csv(root / closed, layout.VQA_COLUMNS, [
        GOOD_ROW,
        with_value(GOOD_ROW, "Question Type", "7"),
        with_value(GOOD_ROW, "Answer Choice", "E"),
        GOOD_ROW[:-1],
        with_value(GOOD_ROW, "Image Path", "v/../../outside.nii.gz"),
        with_value(GOOD_ROW, "Image Path", "v/small.nii.gz"),  # a second listing of the wrong shape
        with_value(GOOD_ROW, "Question", ""),
    ])  # fmt: skip
    val = layout.VQA_DIR + "/" + layout.VQA_CSV["validation"]
    write_csv(root / val, [c for c in layout.VQA_COLUMNS if c != "Answer Choice"], [GOOD_ROW[:-1]])
    yes_no = layout.VQA_DIR + "/" + layout.VQA_YN_CSV["train"]
    write_csv(root / yes_no, layout.VQA_YN_COLUMNS, [["v/good.nii.gz", "r", "4", "Lesion?", "Yes"],
                                                     ["v/good.nii.gz", "r", "4", "Lesion?", "Maybe"]])  # fmt: skip
    planted = [
        ("record", [cap, "train[1]", "missing.nii.gz", "not found"]),
        ("volume", ["corrupt.nii.gz", "cannot read", "train[2]"]),
        ("volume", ["small.nii.gz", "shape (1, 4, 8, 8)", "expected (1, 6, 8, 8)", "train[3]", "and 1 more"]),
        ("volume", ["hot.nii.gz", "expected [0, 1]", "train[4]"]),
        ("volume", ["nan.npy", "1 NaN", "train[5]"]),
        ("record", [cap, "train[6]", "empty.txt", "empty"]),
        ("record", [cap, "train[7]", "absent.txt", "not found"]),
        ("record", [cap, "train[8]", "outside the data root"]),
        ("record", [cap, "train[9]", "absolute"]),
        ("record", [cap, "train[10]", "'text'"]),
        ("file", [cap, "no split 'test'"]),
        ("record", [closed, "row 3", "Question Type", "'7'"]),
        ("record", [closed, "row 4", "Answer Choice", "'E'"]),
        ("record", [closed, "row 5", "9 fields"]),
        ("record", [closed, "row 6", "outside the data root"]),
        ("record", [closed, "row 8", "empty 'Question'"]),
        ("file", [val, "row 1", "Answer Choice"]),
        ("record", [yes_no, "row 3", "'Maybe'"]),
    ]
    return root, planted


def assert_reports_exactly(report, planted) -> None:
    unmatched = list(report.problems)
    for kind, fragments in planted:
        matches = [p for p in unmatched if p.kind == kind and all(f in p.message for f in fragments)]
        assert len(matches) == 1, f"planted {kind} {fragments}: matched {matches}\nall: {report.text(None)}"
        unmatched.remove(matches[0])
    assert not unmatched, f"unexpected problems: {unmatched}"


def test_every_planted_problem_is_reported_once(broken_root):
    root, planted = broken_root
    report = check_dataset(root, shape=SHAPE, workers=1)
    assert_reports_exactly(report, planted)
    assert report.exit_code == 1
    assert report.volumes == 5  # good, corrupt, small, hot, nan: each loaded once
    text = report.text(None)
    assert f"{len(planted)} problems" in text
    assert "not present: M3D-VQA/M3D_VQA_test.csv" in text


def test_parallel_check_finds_the_same(broken_root):
    root, planted = broken_root
    assert_reports_exactly(check_dataset(root, shape=SHAPE, workers=2), planted)


def test_without_loading_volumes_only_records_are_checked(broken_root):
    root, planted = broken_root
    report = check_dataset(root, shape=SHAPE, load_volumes=False)
    assert_reports_exactly(report, [(kind, fragments) for kind, fragments in planted if kind != "volume"])


def test_shape_and_range_can_be_left_open(broken_root):
    root, planted = broken_root
    report = check_dataset(root, shape=None, value_range=None, workers=1)
    kept = [(k, f) for k, f in planted if not any(name in f[0] for name in ("small.nii.gz", "hot.nii.gz"))]
    assert_reports_exactly(report, kept)


def test_clean_dataset_has_no_problems(tiny_m3d_root):
    report = check_dataset(tiny_m3d_root, shape=(8, 16, 16), workers=1)
    assert report.problems == [] and report.exit_code == 0
    assert report.volumes == 8 and "no problems found" in report.text()
    # the SPEC §6 default shape is 128 x 256 x 256: the tiny volumes are each reported
    report = check_dataset(tiny_m3d_root, workers=1)
    assert len(report.problems) == 8 and all("expected (1, 128, 256, 256)" in p.message for p in report.problems)


def test_missing_fast_copies_are_named(tiny_m3d_root):
    report = check_dataset(tiny_m3d_root, shape=(8, 16, 16), volume_format="nii", load_volumes=False)
    messages = [p.message for p in report.problems]
    assert all(p.kind == "record" for p in report.problems) and messages
    assert any("case0.nii not found" in m and "M3D_Cap.json: train[0]" in m and "convert=" in m for m in messages)


def test_not_a_dataset(tmp_path):
    report = check_dataset(tmp_path, workers=1)
    assert [p.kind for p in report.problems] == ["file"] and "is this a dataset root" in report.problems[0].message
    with pytest.raises(ValueError, match="volume_format"):
        check_dataset(tmp_path, volume_format="mha")


def test_command_line_exit_status(broken_root, tiny_m3d_root, tmp_path):
    root, planted = broken_root
    command = [sys.executable, "-m", "med3dvlm.check", "progress=false", "workers=1", f"hydra.run.dir={tmp_path}"]
    broken = subprocess.run([*command, f"root={root}", "shape=[6,8,8]"], capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1, broken.stderr
    assert f"{len(planted)} problems" in broken.stdout and "row 4" in broken.stdout
    saved = json.loads((tmp_path / "check_report.json").read_text(encoding="utf-8"))
    assert len(saved["problems"]) == len(planted)
    clean = subprocess.run([*command, f"root={tiny_m3d_root}", "shape=[8,16,16]"], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no problems found" in clean.stdout
