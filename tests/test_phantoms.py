"""The embedded phantom dataset: exact M3D layout, determinism, truthful text, generate-once.

The truthfulness tests read attributes from the written answers and verify them against the
volume with independent image measurements (body extent, aorta brightness, lesion intensities in
the documented atlas region), not against the generator's own case records.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from med3dvlm.data import layout
from med3dvlm.data import phantoms as P

SHAPE = (32, 64, 64)
NUM_CASES = 12
PLANE_AXES = {"Axial": ("z", "y", "x"), "Coronal": ("y", "z", "x"), "Sagittal": ("x", "z", "y")}
PHASE_ANSWERS = ("Non-contrast", "Arterial phase", "Portal venous phase")
KIND_ANSWERS = ("Cyst", "Mass", "Calcification")
IMAGE_PATH = r"ct_case/(\d{6})/(Axial|Coronal|Sagittal)_(noncontrast|arterial|venous)/volume\.nii\.gz"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "data"
    P.make_phantom_dataset(root, num_cases=NUM_CASES, shape=SHAPE, seed=0)
    return root


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="ascii") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def all_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def load_nifti(path: Path) -> np.ndarray:
    image = nib.load(path)
    assert image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(image.affine, np.eye(4))
    return np.asanyarray(image.dataobj).transpose(2, 1, 0)  # file (x, y, z) -> (D, H, W)


# ----------------------------------------------------------------------------------------------
# Layout and determinism
# ----------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_other_seed_differs(root: Path, tmp_path: Path) -> None:
    again = P.make_phantom_dataset(tmp_path / "again", num_cases=NUM_CASES, shape=SHAPE, seed=0).root
    first, second = all_files(root), all_files(again)
    assert first.keys() == second.keys()
    for name, path in first.items():
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(load_nifti(path), load_nifti(second[name]))
        else:
            assert path.read_bytes() == second[name].read_bytes(), name

    other = P.make_phantom_dataset(tmp_path / "other", num_cases=3, shape=SHAPE, seed=1).root
    cap, other_cap = (json.loads((r / layout.CAP_JSON).read_text())["train"][0] for r in (root, other))
    assert (root / cap["text"]).read_text() != (other / other_cap["text"]).read_text()
    assert not np.array_equal(load_nifti(root / cap["image"]), load_nifti(other / other_cap["image"]))


def test_layout_is_exactly_m3d(root: Path) -> None:
    cap = json.loads((root / layout.CAP_JSON).read_text(encoding="ascii"))
    assert list(cap) == list(layout.CAP_SPLITS)
    assert {s: len(cap[s]) for s in layout.CAP_SPLITS} == {"train": 8, "validation": 2, "test": 2}
    images = {s: {e["image"] for e in cap[s]} for s in layout.CAP_SPLITS}
    seen = set()
    for split in layout.CAP_SPLITS:
        for entry in cap[split]:
            assert set(entry) == {"image", "text"}
            case = re.fullmatch(IMAGE_PATH, entry["image"])
            assert case, entry["image"]
            assert entry["text"] == f"ct_case/{case.group(1)}/text.txt"
            assert case.group(1) not in seen
            seen.add(case.group(1))
            for rel in entry.values():
                assert not os.path.isabs(rel) and ".." not in Path(rel).parts
                assert (root / rel).resolve().is_relative_to(root.resolve())
                assert (root / rel).is_file()

    for split in layout.CAP_SPLITS:
        header, rows = read_csv(root / layout.VQA_DIR / layout.VQA_CSV[split])
        assert header == list(layout.VQA_COLUMNS)
        yn_header, yn_rows = read_csv(root / layout.VQA_DIR / layout.VQA_YN_CSV[split])
        assert yn_header == list(layout.VQA_YN_COLUMNS)
        # A case's questions live in the split of its volume; every case covers all five types.
        for table in (rows, yn_rows):
            assert {r["Image Path"] for r in table} == images[split]
            for image in images[split]:
                types = {int(r["Question Type"]) for r in table if r["Image Path"] == image}
                assert types == set(layout.QUESTION_TYPES)
        report = {e["image"]: (root / e["text"]).read_text(encoding="ascii").strip() for e in cap[split]}
        assert all(r["Text"] == report[r["Image Path"]] for r in rows + yn_rows)

    marker = P.read_phantom_marker(root)
    assert marker["complete"] and marker["params"]["shape"] == list(SHAPE)
    assert sorted(marker["files"]) == sorted(n for n in all_files(root) if n != P.MARKER_NAME)
    for path in all_files(root).values():  # all text ASCII
        if not path.name.endswith((".nii.gz", ".npy")):
            path.read_bytes().decode("ascii")


def test_volumes_are_float32_unit_range_in_released_axis_order(root: Path, tmp_path: Path) -> None:
    cap = json.loads((root / layout.CAP_JSON).read_text())
    for entry in cap["train"][:4]:
        volume = load_nifti(root / entry["image"])
        assert volume.shape == SHAPE and volume.dtype == np.float32
        assert volume.min() >= 0.0 and volume.max() <= 1.0
    # .npy holds the same arrays as (1, D, H, W), M3D's release layout.
    npy = P.make_phantom_dataset(tmp_path / "npy", num_cases=3, shape=SHAPE, volume_format="npy").root
    entry = json.loads((npy / layout.CAP_JSON).read_text())["train"][0]
    assert entry["image"].endswith("/volume.npy")
    array = np.load(npy / entry["image"])
    assert array.shape == (1, *SHAPE) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], load_nifti(root / cap["train"][0]["image"]))


def test_project_readers_accept_every_sample(root: Path) -> None:
    from med3dvlm.data.tasks import read_task_split

    expected = {"caption": 1, "vqa_closed": 8, "vqa_open": 8, "vqa_yes_no": 6}  # per case
    for task, per_case in expected.items():
        for split, n_cases in zip(layout.CAP_SPLITS, (8, 2, 2)):
            result = read_task_split(root, task, split)
            assert len(result.samples) == per_case * n_cases and not result.skipped


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------
def test_closed_choices_distinct_and_letters_balanced(root: Path) -> None:
    letters = Counter()
    for split in layout.CAP_SPLITS:
        _, rows = read_csv(root / layout.VQA_DIR / layout.VQA_CSV[split])
        for row in rows:
            choices = {x: row[f"Choice {x}"] for x in layout.ANSWER_LETTERS}
            assert len(set(choices.values())) == 4 and all(choices.values())
            assert choices[row["Answer Choice"]] == row["Answer"]
            assert layout.closed_prompt(row["Question"], choices).startswith(row["Question"] + " Choices: A. ")
            letters[row["Answer Choice"]] += 1
    assert set(letters) == set(layout.ANSWER_LETTERS)
    assert len(set(letters.values())) == 1, letters


def test_yes_no_balanced(root: Path) -> None:
    answers = Counter()
    for split in layout.CAP_SPLITS:
        _, rows = read_csv(root / layout.VQA_DIR / layout.VQA_YN_CSV[split])
        answers.update(r["Answer"] for r in rows)
    assert set(answers) == set(layout.YES_NO_ANSWERS)
    assert answers["Yes"] == answers["No"]


# ----------------------------------------------------------------------------------------------
# Truthfulness: what the text claims is measurable in the image
# ----------------------------------------------------------------------------------------------
def atlas(shape: tuple[int, ...], plane: str) -> dict[str, np.ndarray]:
    """Documented convention: voxel centres span [-1, 1] along each array axis."""
    out = {}
    for axis, name in enumerate(PLANE_AXES[plane]):
        view = [1, 1, 1]
        view[axis] = shape[axis]
        out[name] = ((np.arange(shape[axis]) * 2.0 + 1.0) / shape[axis] - 1.0).reshape(view)
    return out


def detect_plane(volume: np.ndarray) -> str:
    """From the body outline alone: it spans the whole superior-inferior axis, and is narrowest
    anterior-posterior (an elliptic cross-section)."""
    body = volume > 0.1
    extent = [float((body.mean(axis=tuple(b for b in range(3) if b != a)) > 0.05).mean()) for a in range(3)]
    si, ap = int(np.argmax(extent)), int(np.argmin(extent))
    return {(0, 1): "Axial", (0, 2): "Axial", (1, 0): "Coronal", (1, 2): "Sagittal"}[(si, ap)]


def aorta_brightness(volume: np.ndarray, plane: str) -> float:
    """Brightest per-column median along z near the atlas aorta: robust to lesions and noise."""
    (ax, ay), _, _ = P.AORTA
    c = atlas(volume.shape, plane)
    window = (np.abs(c["x"] - ax) <= 0.07) & (np.abs(c["y"] - ay) <= 0.07) & (c["z"] >= -0.7) & (c["z"] <= 0.3)
    columns = np.where(window, volume, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns outside the window
        medians = np.nanmedian(columns, axis=PLANE_AXES[plane].index("z"))
    return float(np.nanmax(medians))


def parse_location(answer: str) -> tuple[str, str | None, str | None]:
    """'Upper pole of the left kidney' -> ('left_kidney', None, 'upper'); liver -> lobe side."""
    words = answer.lower()
    level = next((lv for lv in ("upper", "lower") if words.startswith(lv)), None)
    side = next((s for s in ("right", "left") if f"{s} " in words), None)
    if "hepatic" in words:
        return "liver", side, level
    if "kidney" in words:
        return f"{side}_kidney", None, level
    return "spleen", None, level


def region(volume: np.ndarray, plane: str, key: str, side: str | None = None, level: str | None = None) -> np.ndarray:
    """Voxels of an atlas organ; optionally the patient-right/left part and upper/lower part."""
    c, organ = atlas(volume.shape, plane), P.ANATOMY[key]
    q = sum(((c[n] - organ.center[i]) / organ.semi[i]) ** 2 for i, n in enumerate("xyz"))
    mask = q <= 1.0
    if side is not None:  # patient right = smaller x
        mask = mask & ((c["x"] < organ.center[0]) if side == "right" else (c["x"] >= organ.center[0]))
    if level is not None:  # upper = superior = smaller z
        mask = mask & ((c["z"] < organ.center[2]) if level == "upper" else (c["z"] >= organ.center[2]))
    return np.broadcast_to(mask, volume.shape)


SIGNATURES = {  # what each lesion kind looks like against any organ in any phase (organs <= 0.66)
    "Cyst": lambda v: v < 0.3,
    "Mass": lambda v: (v >= 0.75) & (v < 0.95),
    "Calcification": lambda v: v >= 0.96,
}


def cases(root: Path) -> list[dict]:
    """Per case: open answers by question, read from the VQA CSVs, plus the report."""
    out = {}
    for split in layout.CAP_SPLITS:
        _, rows = read_csv(root / layout.VQA_DIR / layout.VQA_CSV[split])
        for row in rows:
            case = out.setdefault(row["Image Path"], {"image": row["Image Path"], "report": row["Text"]})
            answer, qtype = row["Answer"], int(row["Question Type"])
            if qtype == 1:
                case["plane"] = answer
            elif qtype == 2:
                case["phase"] = answer
            elif qtype == 5:
                case["location"] = answer
            elif answer in KIND_ANSWERS:
                case["kind"] = answer
            elif row["Question"].startswith(("How many", "What is the number")):
                case["count"] = ["One", "Two", "Three"].index(answer) + 1
            elif answer.split()[0] in ("Small", "Large"):
                case["size"] = answer.split()[0].lower()
    return list(out.values())


def test_answers_and_report_match_the_image(root: Path) -> None:
    per_lesion: dict[tuple[str, str], list[float]] = {}
    for case in cases(root):
        volume = load_nifti(root / case["image"])
        report = case["report"].lower()
        plane, phase, kind = case["plane"], case["phase"], case["kind"]
        # Plane: from the body outline.
        assert detect_plane(volume) == plane, case
        assert plane.lower() in report
        # Phase: aorta unenhanced / moderately / brightly opacified.
        level = aorta_brightness(volume, plane)
        expected = {
            "Non-contrast": level < 0.55,
            "Portal venous phase": 0.6 < level < 0.85,
            "Arterial phase": level > 0.88,
        }
        assert expected[phase], (case, level)
        assert {
            "Non-contrast": "non-contrast",
            "Arterial phase": "arterial phase",
            "Portal venous phase": "portal venous phase",
        }[phase] in report
        # Kind, at the stated location: its intensity signature is there, the others' are not.
        key, side, lvl = parse_location(case["location"])
        values = volume[region(volume, plane, key, side, lvl)]
        found = {k: int(f(values).sum()) for k, f in SIGNATURES.items()}
        assert found[kind] >= 3, (case, found)
        if kind == "Cyst":
            assert found["Calcification"] == 0 and found["Mass"] * 10 <= found["Cyst"], (case, found)
        elif kind == "Mass":
            assert found["Cyst"] == 0 and found["Calcification"] * 5 < found["Mass"], (case, found)
        else:
            assert found["Cyst"] == 0 and found["Calcification"] > found["Mass"], (case, found)
        assert {"Cyst": "cyst", "Mass": "mass", "Calcification": "calcification"}[kind] in report
        # ... and more of it in the stated part of the organ than in the complementary part.
        if lvl is not None:
            other = region(volume, plane, key, side, "lower" if lvl == "upper" else "upper")
        elif key == "liver":
            other = region(volume, plane, key, "left" if side == "right" else "right")
        elif key.endswith("kidney"):
            other = region(volume, plane, "left_kidney" if key.startswith("right") else "right_kidney")
        else:
            other = None
        if other is not None:
            assert int(SIGNATURES[kind](volume[other]).sum()) < found[kind], case
        organ_word = {"liver": "liver", "spleen": "spleen"}.get(key, "kidney")
        assert organ_word in report or (organ_word == "liver" and "hepatic" in report)
        assert case["size"] in report
        per_lesion.setdefault((kind, case["size"]), []).append(found[kind] / case["count"])
    # Size: per lesion, every large one of a kind covers more voxels than every small one.
    for kind in KIND_ANSWERS:
        if (kind, "large") in per_lesion and (kind, "small") in per_lesion:
            assert min(per_lesion[(kind, "large")]) > max(per_lesion[(kind, "small")]), per_lesion


def test_stated_lesion_count_is_visible(root: Path) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    for case in cases(root):
        volume = load_nifti(root / case["image"])
        key, _, _ = parse_location(case["location"])
        mask = SIGNATURES[case["kind"]](volume) & region(volume, case["plane"], key)
        labels, _ = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        assert int((sizes >= 2).sum()) == case["count"], (case, sizes)


# ----------------------------------------------------------------------------------------------
# Generate once, refuse foreign folders, validation, command line
# ----------------------------------------------------------------------------------------------
def test_ensure_generates_once_and_regenerates_on_change(tmp_path: Path) -> None:
    root = tmp_path / "ensure"
    params = {"num_cases": 4, "shape": (16, 32, 32), "seed": 3}
    first = P.ensure_phantom_dataset(root, **params)
    assert first.generated and first.num_cases == 4
    mtimes = {n: p.stat().st_mtime_ns for n, p in all_files(root).items()}
    second = P.ensure_phantom_dataset(root, **{**params, "shape": [16, 32, 32]})  # lists from configs
    assert not second.generated and second.split_cases == first.split_cases
    assert {n: p.stat().st_mtime_ns for n, p in all_files(root).items()} == mtimes

    third = P.ensure_phantom_dataset(root, **{**params, "num_cases": 3, "seed": 4})
    assert third.generated
    assert P.read_phantom_marker(root)["params"]["seed"] == 4
    assert len(list((root / "ct_case").iterdir())) == 3  # the fourth case of the old set is gone
    assert sorted(all_files(root)) == sorted(P.read_phantom_marker(root)["files"] + [P.MARKER_NAME])

    (root / "ct_case" / "000000" / "text.txt").unlink()  # an incomplete dataset is regenerated
    assert P.ensure_phantom_dataset(root, **{**params, "num_cases": 3, "seed": 4}).generated


def test_refuses_non_empty_foreign_root_unless_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "real"
    root.mkdir()
    (root / "notes.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="overwrite"):
        P.make_phantom_dataset(root, num_cases=3, shape=(16, 32, 32))
    P.make_phantom_dataset(root, num_cases=3, shape=(16, 32, 32), overwrite=True)
    assert (root / "notes.txt").read_text() == "real data" and (root / layout.CAP_JSON).is_file()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (8, 64, 64)},
        {"shape": (129, 64, 64)},
        {"shape": (32, 64, 512)},
        {"shape": (32, 64)},
        {"num_cases": 2},
        {"volume_format": "png"},
        {"split_fractions": (0.5, 0.5, 0.0)},
    ],
)
def test_invalid_parameters_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        P.make_phantom_dataset(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_command_line(tmp_path: Path, capsys) -> None:
    from med3dvlm.phantoms import main

    command = [sys.executable, "-m", "med3dvlm.phantoms"]
    target = tmp_path / "cli"
    # Both at once: each start imports the package (several seconds on a CPU).
    help_run = subprocess.Popen([*command, "--help"], stdout=subprocess.PIPE, text=True)
    tiny_run = subprocess.Popen(
        [*command, f"root={target}", "num_cases=3", "shape=[16,32,32]", "seed=2", "volume_format=npy"],
        stdout=subprocess.PIPE,
        text=True,
    )
    help_text, _ = help_run.communicate(timeout=120)
    out, _ = tiny_run.communicate(timeout=120)
    assert help_run.returncode == 0
    for key in ("root:", "num_cases:", "shape:", "seed:", "volume_format:", "overwrite:", "if_missing:"):
        assert key in help_text
    assert tiny_run.returncode == 0 and len(out.strip().splitlines()) == 1 and "3 cases" in out
    assert len(list(target.rglob("volume.npy"))) == 3
    assert sorted(p.name for p in Path.cwd().glob(".hydra")) == []  # a one-shot command writes no run folder

    # In-process for the rest: the same `main`, without paying the start-up again.
    mtimes = {n: p.stat().st_mtime_ns for n, p in all_files(target).items()}
    args = [f"root={target}", "num_cases=3", "shape=[16,32,32]", "seed=2", "volume_format=npy"]
    assert main([*args, "if_missing=true"]) == 0
    assert {n: p.stat().st_mtime_ns for n, p in all_files(target).items()} == mtimes
    before = {n: p.read_bytes() for n, p in all_files(target).items()}
    assert main(args) == 0  # rewriting the same dataset is idempotent
    assert {n: p.read_bytes() for n, p in all_files(target).items()} == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    capsys.readouterr()
    assert main([f"root={foreign}", "num_cases=3", "shape=[16,32,32]"]) == 2
    assert str(foreign) in capsys.readouterr().err
    assert main([f"root={foreign}", "shape=[8,32,32]"]) == 2
    assert "16" in capsys.readouterr().err  # the smallest size allowed is named
    assert main([f"root={foreign}", "shape=[16,32]"]) == 2
    assert "expected 3 numbers" in capsys.readouterr().err
