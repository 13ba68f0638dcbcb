"""Preparation of raw M3D-Cap cases and HU NIfTI volumes (SPEC §6), resume, splits and VQA CSVs.

The raw trees are made here: PNG/JPEG slices and report files with the odd cases real data has
(mixed slice shapes, a corrupt slice, a non-ASCII series name, reports with and without
``study_findings:``, an empty series folder, a case without a report, a NIfTI volume in HU).
Expected volumes are computed independently with numpy (stack, scale, crop by hand) and with
scipy's zoom for the trilinear resize.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra_helpers import compose_config
from PIL import Image
from scipy import ndimage

from med3dvlm.data import M3DCapDataModule, M3DVQADataModule, layout, load_volume
from med3dvlm.data import prepare as P
from med3dvlm.data.ct import load_ct
from med3dvlm.data.volumes import ENCODING_LEVELS

SLICE_SHAPE = (20, 24)  # (H, W) of the raw slices
BOX = (slice(4, 16), slice(5, 21))  # rows, columns of the foreground of every raw slice
SMALL = (6, 8, 8)  # prepared shape in most tests: small and fast
FAST = P.FAST_VOLUME_FORMAT


# ----------------------------------------------------------------------------------------------
# Raw trees
# ----------------------------------------------------------------------------------------------


def box_slice(rng: np.random.Generator, shape=SLICE_SHAPE, value: int | None = None) -> np.ndarray:
    """A uint8 slice: 0 outside ``BOX``, random 1..255 (or ``value``) inside."""
    image = np.zeros(shape, dtype=np.uint8)
    rows, cols = BOX
    size = (rows.stop - rows.start, cols.stop - cols.start)
    image[rows, cols] = value if value is not None else rng.integers(1, 256, size=size)
    return image


def write_slices(folder: Path, slices, suffix=".png", numbers=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, array in zip(numbers or range(len(slices)), slices):
        Image.fromarray(array).save(folder / f"{number}{suffix}", quality=95)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def hu_display_volume(rng: np.random.Generator) -> np.ndarray:
    """(D, H, W) = (7, 9, 11) HU in display order: air, a body box of random HU, one hot voxel."""
    volume = np.full((7, 9, 11), -1000.0, dtype=np.float32)
    volume[1:6, 2:8, 1:10] = rng.integers(-100, 1200, size=(5, 6, 9))
    volume[1, 2, 1] = 3000.0  # asymmetric marker at the head, front, patient-right corner
    return volume


AXIAL_SERIES = "Axial C+ portal venous phase"
ODD_SERIES = "Axial contrasté – phase"  # non-ASCII, and a dash NFKD cannot decompose
REPORT_FINDINGS = "age: 52\ngender: F\nstudy_findings:\nLiver lesion of 3 cm.\n\n Second line.\n"
REPORT_DISCUSSION = "Case of the week\ndiscussion: Simple renal cyst.\nNothing else."
REPORT_PLAIN = "Plain report.\nNo section markers here.\n"


def make_raw_tree(root: Path) -> Path:
    """The raw tree of odd cases; returns ``root``. Slice values depend on the case, so nothing is reused."""
    rng = np.random.default_rng(0)
    # 000001: two good series (PNG with slices 0 and 11 empty; JPEG), report with study_findings:
    case = root / "000001"
    axial = [box_slice(rng) for _ in range(12)]
    axial[0][:] = 0
    axial[11][:] = 0
    write_slices(case / AXIAL_SERIES, axial)
    write_slices(case / "Coronal", [box_slice(rng, value=40 * (i + 1)) for i in range(5)], suffix=".jpg")
    write_text(case / "text.txt", REPORT_FINDINGS)
    write_text(case / "Thumbs.db", "not a series")  # a stray file: ignored, with a note
    # 000002: mixed slice shapes in a non-ASCII series; report with discussion: only
    case = root / "000002"
    mixed = [box_slice(rng) for _ in range(5)]
    mixed.insert(2, box_slice(rng, shape=(30, 30)))
    mixed.insert(5, box_slice(rng, shape=(30, 30)))
    write_slices(case / ODD_SERIES, mixed)
    write_text(case / "text.txt", REPORT_DISCUSSION)
    # 000003: a good series, a corrupt slice, an empty series folder; report without markers
    case = root / "000003"
    write_slices(case / "Axial", [box_slice(rng) for _ in range(4)])
    write_slices(case / "Broken", [box_slice(rng) for _ in range(3)])
    (case / "Broken" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    (case / "Empty").mkdir()
    write_text(case / "text.txt", REPORT_PLAIN)
    # 000004: nothing but an empty series folder -> the case fails
    write_text(root / "000004" / "text.txt", "Report of a case without images.")
    (root / "000004" / "Empty").mkdir()
    # 000005: slices but no report -> the case fails (require_report)
    write_slices(root / "000005" / "Axial", [box_slice(rng) for _ in range(3)])
    # hu_case: a NIfTI volume in HU (RAS+ file, as nibabel writes by default) with its report
    display = hu_display_volume(rng)
    nib.save(nib.Nifti1Image(display.transpose(2, 1, 0)[::-1, ::-1, ::-1].copy(), np.diag([0.8, 0.8, 2.5, 1])),
             root / "hu_case.nii.gz")  # fmt: skip
    write_text(root / "hu_case.txt", "study_findings: Own CT, soft tissue window.")
    write_text(root / "README.md", "not a case")  # ignored, with a note
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_raw_tree(tmp_path_factory.mktemp("raw") / "ct_case")


def write_vqa_csvs(vqa_dir: Path) -> None:
    """M3D-style VQA CSVs whose image paths name M3D's .npy volumes."""
    image = "ct_case/000001/Axial_C__portal_venous_phase.npy"
    closed = [image, "report", "1", "What plane is this?", "Axial", "Coronal", "Sagittal", "Oblique", "Axial", "A"]
    other = ["ct_case/000003/Axial.npy", "report", "3", "Which organ?", "Liver", "Kidney", "Lung", "Bone", "Liver", "A"]
    bad = ["ct_case/000003/Axial.mha", *closed[1:]]
    for split, name in layout.VQA_CSV.items():
        rows = [closed, other] + ([bad] if split == "train" else [])
        write_csv(vqa_dir / name, layout.VQA_COLUMNS, rows)
    write_csv(vqa_dir / layout.VQA_YN_CSV["train"], layout.VQA_YN_COLUMNS, [[image, "report", "4", "Lesion?", "Yes"]])


def write_csv(path: Path, columns, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


EVERY_CASE_TO_TRAIN = P.SplitRule(fractions=(1.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> tuple[Path, P.Summary]:
    """The raw tree prepared at ``SMALL`` with both formats, VQA CSVs rewritten, one process."""
    out = tmp_path_factory.mktemp("prepared") / "M3D"
    vqa_dir = tmp_path_factory.mktemp("vqa")
    write_vqa_csvs(vqa_dir)
    settings = P.PrepareSettings(shape=SMALL)
    summary = P.prepare_dataset(raw, out, settings, EVERY_CASE_TO_TRAIN, vqa_dir=vqa_dir, workers=1, progress=False)
    return out, summary


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Text, names and splits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (REPORT_FINDINGS, "Liver lesion of 3 cm. Second line."),
        ("study_findings: A.\ndiscussion: B.", "A. discussion: B."),  # SPEC: what *follows* the marker
        (REPORT_DISCUSSION, "Simple renal cyst. Nothing else."),
        (REPORT_PLAIN, "Plain report. No section markers here."),
        ("Intro.\nstudy_findings:  \n", "Intro. study_findings:"),  # nothing follows: the next rule
        ("  \n\n", ""),
    ],
)
def test_report_text_follows_spec_markers(text, expected):
    assert P.extract_report(text) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Axial C+ portal venous phase", "Axial_C__portal_venous_phase"),  # M3D's own naming
        (ODD_SERIES, "Axial_contraste___phase"),
        ("Straße Ø/ß", "Strasse_O_ss"),
        ("Coronal_bone-window.2", "Coronal_bone-window.2"),
    ],
)
def test_ascii_names(name, expected):
    assert P.ascii_name(name) == expected
    assert P.ascii_name(name).isascii()


def test_split_is_the_documented_hash_and_stable():
    fractions, seed = (0.5, 0.3, 0.2), 7
    keys = [f"ct_case/{i:06d}" for i in range(4000)]
    splits = [P.assign_split(key, fractions, seed) for key in keys]
    for key, split in zip(keys[:50], splits):  # the rule, written out independently
        u = int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:16], 16) / 2**64
        assert split == ("train" if u < 0.5 else "validation" if u < 0.8 else "test")
    counts = {name: splits.count(name) / len(keys) for name in layout.CAP_SPLITS}
    assert counts == pytest.approx({"train": 0.5, "validation": 0.3, "test": 0.2}, abs=0.03)
    assert [P.assign_split(key, fractions, seed) for key in keys[::-1]] == splits[::-1]  # order-free
    assert [P.assign_split(key, fractions, seed + 1) for key in keys] != splits


# ----------------------------------------------------------------------------------------------
# Series processing against independent references
# ----------------------------------------------------------------------------------------------


def test_crop_and_resize_matches_scipy_trilinear():
    rng = np.random.default_rng(1)
    volume = np.zeros((9, 14, 12), dtype=np.float32)
    volume[2:7, 3:12, 1:10] = rng.random((5, 9, 9), dtype=np.float32) + 0.01
    out = P.crop_and_resize(volume, (8, 6, 13), "test")
    box = volume[2:7, 3:12, 1:10].astype(np.float64)
    # align_corners=False trilinear == scipy's zoom on the pixel grid with edge replication
    expected = ndimage.zoom(box, [8 / 5, 6 / 9, 13 / 9], order=1, grid_mode=True, mode="nearest")
    assert out.shape == (8, 6, 13) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 6, 13), (32, 64, 64), (5, 9, 9)])
def test_crop_and_resize_equal_monais_transforms(shape):
    """The steps call MONAI's bounding box and torch's interpolation directly: the same arrays as
    MONAI's ``CropForeground(margin=0)`` then ``Resize(mode="trilinear")``, clipped to [0, 1]."""
    from monai.transforms import CropForeground, Resize

    from med3dvlm.data.preprocessing import crop_foreground, resize

    rng = np.random.default_rng(2)
    volume = np.zeros((20, 40, 36), dtype=np.float32)
    volume[3:17, 5:33, 2:35] = rng.random((14, 28, 33), dtype=np.float32)
    volume[3:17, 5:33, 2:35][rng.random((14, 28, 33)) < 0.3] = 0.0  # holes inside the box stay
    cropped = crop_foreground(volume, "test")
    reference_crop = np.asarray(CropForeground(margin=0)(volume[np.newaxis]))[0]
    np.testing.assert_array_equal(cropped, reference_crop)
    resized = resize(cropped, shape)
    reference = np.clip(np.asarray(Resize(spatial_size=shape, mode="trilinear")(reference_crop[np.newaxis]))[0], 0, 1)
    assert resized.dtype == np.float32 and resized.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(resized, reference)


def prepared_volume(out: Path, relative: str) -> np.ndarray:
    return load_volume(out / relative)[0]


def test_slices_are_stacked_in_numeric_order_scaled_and_cropped(tmp_path):
    """12 PNG slices 0..11 (so "10.png" sorts before "2.png" by name); resize to the crop = identity."""
    rng = np.random.default_rng(5)
    slices = [box_slice(rng) for _ in range(12)]
    slices[0][:] = 0  # empty first and last slices are cropped away
    slices[11][:] = 0
    write_slices(tmp_path / "raw" / "000001" / "Axial", slices)
    write_text(tmp_path / "raw" / "000001" / "text.txt", "study_findings: x")
    stack = np.stack(slices).astype(np.float64)
    expected = (stack / stack.max())[1:11, BOX[0], BOX[1]]  # min is 0; crop to the box by hand
    settings = P.PrepareSettings(shape=expected.shape, formats=("nii.gz",))
    summary = P.prepare_dataset(tmp_path / "raw", tmp_path / "out", settings, workers=1, progress=False)
    assert summary.exit_code == 0, summary.text()
    got = prepared_volume(tmp_path / "out", "ct_case/000001/Axial.nii.gz")
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_mixed_shapes_keep_the_most_common(prepared, tmp_path):
    out, summary = prepared
    rng = np.random.default_rng(9)
    slices = [box_slice(rng) for _ in range(4)]
    slices.insert(1, box_slice(rng, shape=(30, 30)))
    folder = tmp_path / "S"
    write_slices(folder, slices)
    kept = np.stack([s for s in slices if s.shape == SLICE_SHAPE]).astype(np.float64)
    volume, note = P.stack_slices(P.numbered_slices(folder))
    np.testing.assert_array_equal(volume, kept)
    assert "kept 4 of 5 slices of shape 20x24" in note and "30x30" in note
    # in the prepared fixture: 7 slices, 2 of another shape, reported as a note of case 000002
    assert "kept 5 of 7 slices of shape 20x24" in summary.text()


def test_shape_tie_goes_to_the_earliest_slice(tmp_path):
    rng = np.random.default_rng(2)
    large, small = (30, 30), SLICE_SHAPE
    write_slices(tmp_path / "S", [box_slice(rng, shape) for shape in (large, small, small, large)])
    volume, _ = P.stack_slices(P.numbered_slices(tmp_path / "S"))
    assert volume.shape == (2, 30, 30)


@pytest.mark.parametrize(
    ("affine", "to_file"),
    [
        # RAS+ file (x to the patient's right, y to the front, z to the head): every axis flips
        (np.diag([0.8, 0.8, 2.5, 1.0]), lambda d: d.transpose(2, 1, 0)[::-1, ::-1, ::-1]),
        # LPS file (DICOM's order): only the slice axis flips
        (np.diag([-0.7, -0.7, 3.0, 1.0]), lambda d: d.transpose(2, 1, 0)[:, :, ::-1]),
    ],
    ids=["RAS", "LPS"],
)
def test_hu_nifti_is_reoriented_windowed_and_cropped(tmp_path, affine, to_file):
    display = hu_display_volume(np.random.default_rng(3))  # (D, H, W): head->feet, front->back, right->left
    raw = tmp_path / "raw"
    raw.mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(to_file(display)), affine), raw / "scan.nii.gz")
    write_text(raw / "scan.txt", "discussion: own CT")
    lower, upper = P.DEFAULT_HU_WINDOW
    expected = ((np.clip(display, lower, upper) - lower) / (upper - lower))[1:6, 2:8, 1:10]
    settings = P.PrepareSettings(shape=expected.shape, formats=("nii.gz",))
    summary = P.prepare_dataset(raw, tmp_path / "out", settings, workers=1, progress=False)
    assert summary.exit_code == 0, summary.text()
    got = prepared_volume(tmp_path / "out", "ct_case/scan/scan.nii.gz")
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[0, 0, 0] == 1.0  # the marker voxel stays at the head/front/right corner
    assert (tmp_path / "out/ct_case/scan/text.txt").read_text(encoding="utf-8") == "own CT\n"


def test_hu_nifti_without_reorientation_keeps_file_axes(tmp_path):
    display = hu_display_volume(np.random.default_rng(3))
    file_order = np.ascontiguousarray(display.transpose(2, 1, 0)[::-1])  # some orientation; not undone
    raw = tmp_path / "raw"
    raw.mkdir()
    nib.save(nib.Nifti1Image(file_order, np.eye(4)), raw / "scan.nii")
    volume = load_ct(raw / "scan.nii", reorient=False).volume
    np.testing.assert_array_equal(volume, file_order.transpose(2, 1, 0))


# ----------------------------------------------------------------------------------------------
# The prepared fixture tree: every odd case
# ----------------------------------------------------------------------------------------------


def test_every_case_is_accounted_for(prepared):
    out, summary = prepared
    status = {result.key: result.status for result in summary.results}
    assert status == {
        "ct_case/000001": "prepared",
        "ct_case/000002": "prepared",
        "ct_case/000003": "prepared",
        "ct_case/000004": "failed",
        "ct_case/000005": "failed",
        "ct_case/hu_case": "prepared",
    }
    failed = {r.key: r.reason for r in summary.results if r.status == "failed"}
    assert "no usable series" in failed["ct_case/000004"] and "Empty" in failed["ct_case/000004"]
    assert "no report file" in failed["ct_case/000005"] and "text.txt" in failed["ct_case/000005"]
    assert summary.exit_code == 1
    text = summary.text()
    assert "6 cases: 4 done, 0 skipped (done before), 2 failed" in text
    # the series left out of a prepared case are named with the file and why
    problems = {p for r in summary.results for p in r.problems}
    assert any("'Broken' left out" in p and "1.png" in p and "cannot read slice" in p for p in problems)
    assert any("'Empty' left out" in p and "no slice files" in p for p in problems)
    # stray files are never silently passed over
    assert any(n.endswith("000001/Thumbs.db: ignored (neither a series folder, a NIfTI volume, DICOM nor text.txt)")
               for r in summary.results for n in r.notes)  # fmt: skip
    assert any("README.md: ignored" in note for note in summary.notes)


def test_outputs_follow_the_m3d_layout(prepared):
    out, _ = prepared
    cap = json.loads((out / layout.CAP_JSON).read_text(encoding="utf-8"))
    assert set(cap) == set(layout.CAP_SPLITS)
    assert cap["validation"] == [] and cap["test"] == []  # fractions (1, 0, 0)
    assert sorted(cap["train"], key=lambda e: e["image"]) == [
        {"image": "ct_case/000001/Axial_C__portal_venous_phase.nii.gz", "text": "ct_case/000001/text.txt"},
        {"image": "ct_case/000001/Coronal.nii.gz", "text": "ct_case/000001/text.txt"},
        {"image": "ct_case/000002/Axial_contraste___phase.nii.gz", "text": "ct_case/000002/text.txt"},
        {"image": "ct_case/000003/Axial.nii.gz", "text": "ct_case/000003/text.txt"},
        {"image": "ct_case/hu_case/hu_case.nii.gz", "text": "ct_case/hu_case/text.txt"},
    ]
    cases = ("000001", "000002", "000003")
    reports = {case: (out / "ct_case" / case / "text.txt").read_text(encoding="utf-8") for case in cases}
    assert reports == {
        "000001": "Liver lesion of 3 cm. Second line.\n",
        "000002": "Simple renal cyst. Nothing else.\n",
        "000003": "Plain report. No section markers here.\n",
    }
    for entry in cap["train"]:
        volume = load_volume(out / entry["image"])
        fast = load_volume(out / entry["image"].replace(".nii.gz", ".nii"))
        assert volume.shape == fast.shape == (1, *SMALL) and volume.dtype == np.float32
        assert 0.0 <= volume.min() and volume.max() <= 1.0
        np.testing.assert_allclose(fast, volume, atol=0.5 / ENCODING_LEVELS["uint8"] + 1e-7)
    assert not (out / "ct_case/000004").exists() or not list((out / "ct_case/000004").glob("*.nii*"))
    assert all(p.isascii() for p in files_under(out))


def test_slices_of_other_modes_are_read_as_greyscale(tmp_path):
    deep = np.arange(20 * 24, dtype=np.uint16).reshape(SLICE_SHAPE) * 9  # up to 4311: beyond 8 bits
    Image.fromarray(deep).save(tmp_path / "0.png")
    np.testing.assert_array_equal(P.read_slice(tmp_path / "0.png"), deep.astype(np.float32))
    rgb = np.zeros((*SLICE_SHAPE, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green -> ITU-R 601 luma 0.587 * 200
    Image.fromarray(rgb).save(tmp_path / "1.png")
    grey = P.read_slice(tmp_path / "1.png")
    assert grey.dtype == np.uint8 and grey.shape == SLICE_SHAPE and abs(int(grey[0, 0]) - round(0.587 * 200)) <= 1


def test_cases_without_report_when_allowed(raw, tmp_path):
    settings = P.PrepareSettings(shape=SMALL, formats=("nii.gz",), require_report=False)
    summary = P.prepare_dataset(raw, tmp_path / "M3D", settings, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    assert {r.key: r.status for r in summary.results}["ct_case/000005"] == "prepared"
    assert (tmp_path / "M3D/ct_case/000005/Axial.nii.gz").is_file()
    assert not (tmp_path / "M3D/ct_case/000005/text.txt").exists()
    cap = json.loads((tmp_path / "M3D" / layout.CAP_JSON).read_text())
    assert not [e for e in cap["train"] if "000005" in e["image"]]
    assert "(1 cases without a report not listed)" in summary.text()


def test_jpeg_series_keeps_slice_order(raw, tmp_path):
    volume, _ = P.stack_slices(P.numbered_slices(raw / "000001" / "Coronal"))
    means = volume[:, BOX[0], BOX[1]].mean(axis=(1, 2))
    np.testing.assert_allclose(means, [40, 80, 120, 160, 200], atol=3)  # JPEG is lossy by a few levels


def test_datamodules_load_the_prepared_dataset(prepared):
    out, _ = prepared
    for volume_format in (None, FAST):
        datamodule = M3DCapDataModule(out, batch_size=5, volume_format=volume_format, seed=0)
        datamodule.setup("fit")
        assert len(datamodule.dataset("validation")) == 0  # every case went to train
        batch = next(iter(datamodule.train_dataloader()))
        assert batch["image"].shape == (5, 1, *SMALL)
        suffix = ".nii" if volume_format == FAST else ".nii.gz"
        assert all(path.endswith(suffix) for path in batch["image_path"])
    vqa = M3DVQADataModule(out, mode="closed", batch_size=2, volume_format=FAST, seed=0)
    vqa.setup("test")
    batch = next(iter(vqa.test_dataloader()))
    assert batch["image"].shape == (2, 1, *SMALL)
    assert batch["image_path"][0].endswith("ct_case/000001/Axial_C__portal_venous_phase.nii")


def test_vqa_csvs_are_rewritten_from_npy(prepared):
    out, summary = prepared
    with (out / layout.VQA_DIR / layout.VQA_CSV["train"]).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["Image Path"] for row in rows] == [
        "ct_case/000001/Axial_C__portal_venous_phase.nii.gz",
        "ct_case/000003/Axial.nii.gz",
        "ct_case/000003/Axial.mha",  # not a volume path: copied unchanged and reported
    ]
    assert rows[0]["Question"] == "What plane is this?" and rows[0]["Answer Choice"] == "A"
    assert any("M3D_VQA_train.csv: row 4" in p and "Axial.mha" in p for p in summary.problems)
    yes_no = (out / layout.VQA_DIR / layout.VQA_YN_CSV["train"]).read_text(encoding="utf-8")
    assert "Axial_C__portal_venous_phase.nii.gz" in yes_no and ".npy" not in yes_no
    assert any("M3D_VQA_yn_val.csv: not present" in line for line in summary.text().splitlines())


# ----------------------------------------------------------------------------------------------
# Resume, parallel runs and the command line
# ----------------------------------------------------------------------------------------------


def test_rerun_skips_finished_cases_and_changes_nothing(raw, prepared, tmp_path):
    out, _ = prepared
    before = files_under(out)
    settings = P.PrepareSettings(shape=SMALL)
    summary = P.prepare_dataset(raw, out, settings, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    status = {result.key: result.status for result in summary.results}
    assert [status[f"ct_case/{case}"] for case in ("000001", "000002", "000003", "hu_case")] == ["skipped"] * 4
    assert status["ct_case/000004"] == status["ct_case/000005"] == "failed"  # retried, failed again
    assert any("(earlier run)" in p and "Broken" in p for r in summary.results for p in r.problems)
    after = files_under(out)
    assert {k: v for k, v in after.items() if not k.startswith(layout.VQA_DIR)} == {
        k: v for k, v in before.items() if not k.startswith(layout.VQA_DIR)
    }


def test_changed_settings_redo_cases_and_a_failed_redo_is_not_listed(raw, tmp_path):
    source = tmp_path / "ct_case"
    shutil.copytree(raw, source)
    out = tmp_path / "M3D"
    first = P.PrepareSettings(shape=SMALL, formats=("nii.gz",))
    P.prepare_dataset(source, out, first, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    (source / "000003" / "text.txt").unlink()
    second = P.PrepareSettings(shape=(4, 6, 6), formats=("nii.gz",))
    summary = P.prepare_dataset(source, out, second, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    status = {result.key: result.status for result in summary.results}
    assert status["ct_case/000001"] == "prepared" and status["ct_case/000003"] == "failed"
    cap = json.loads((out / layout.CAP_JSON).read_text())
    assert not [e for e in cap["train"] if "000003" in e["image"]]
    assert {load_volume(out / e["image"]).shape for e in cap["train"]} == {(1, 4, 6, 6)}


class SimulatedKill(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the run catches it."""


def test_resume_after_a_kill_between_write_and_rename(raw, prepared, tmp_path, monkeypatch):
    """Die at the 8th rename: mid-case, a volume fully written under its temporary name."""
    reference, _ = prepared
    out = tmp_path / "M3D"
    settings = P.PrepareSettings(shape=SMALL)
    real_replace, calls = os.replace, []

    def dying_replace(source, target):
        calls.append(target)
        if len(calls) == 8:
            # a real kill leaves the temporary file behind (the writer's cleanup never runs)
            shutil.copy(source, Path(source).with_name(f".{Path(target).name}.0123456789ab.tmp"))
            raise SimulatedKill
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(SimulatedKill):
        P.prepare_dataset(raw, out, settings, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    finished = sorted(p.parent.name for p in out.glob(f"*/*/{P.MANIFEST_NAME}"))
    # root marker + 000001's 4 volumes, report and manifest = 7 renames; the 8th is 000002's volume
    assert finished == ["000001"] and Path(calls[-1]).parent.name == "000002"
    assert [p.name for p in (out / "ct_case/000002").iterdir()] == [f".{Path(calls[-1]).name}.0123456789ab.tmp"]
    # nothing half-written under a final name: every final volume loads
    for path in out.rglob("*.nii*"):
        if not path.name.startswith("."):
            load_volume(path)

    summary = P.prepare_dataset(raw, out, settings, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    status = {result.key: result.status for result in summary.results}
    assert status["ct_case/000001"] == "skipped" and status["ct_case/000002"] == "prepared"
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]  # leftovers of the kill removed
    expected = {k: v for k, v in files_under(reference).items() if not k.startswith(layout.VQA_DIR)}
    got = files_under(out)
    assert set(got) == set(expected)
    for name, data in expected.items():
        if name.endswith(P.MANIFEST_NAME):
            continue  # records the raw folder path, which differs; its content is checked above
        assert got[name] == data, name


def test_two_workers_give_the_same_dataset(raw, prepared, tmp_path):
    reference, _ = prepared
    out = tmp_path / "M3D"
    settings = P.PrepareSettings(shape=SMALL)
    summary = P.prepare_dataset(raw, out, settings, EVERY_CASE_TO_TRAIN, workers=2, progress=False)
    assert sorted(r.status for r in summary.results) == ["failed"] * 2 + ["prepared"] * 4
    expected = files_under(reference)
    for name, data in files_under(out).items():
        if not name.endswith(P.MANIFEST_NAME):
            assert data == expected[name], name


def test_refuses_a_foreign_non_empty_output(raw, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("data")
    with pytest.raises(P.PreparationError, match="not empty"):
        P.prepare_dataset(raw, tmp_path / "out", P.PrepareSettings(shape=SMALL), workers=1, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["precious.txt"]


@pytest.mark.parametrize("out", ["raw", "raw/out", "."], ids=["same", "inside", "parent-of-cases-dir"])
def test_refuses_to_write_into_the_raw_folder(tmp_path, out):
    raw = tmp_path / "ct_case"
    write_slices(raw / "000001" / "Axial", [box_slice(np.random.default_rng(0))])
    out_dir = {"raw": raw, "raw/out": raw / "out", ".": tmp_path}[out]
    with pytest.raises(P.PreparationError, match="would write into raw_dir"):
        P.prepare_dataset(raw, out_dir, P.PrepareSettings(shape=SMALL), workers=1, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [{"shape": (1, 2)}, {"formats": ("nii.gz", "mha")}, {"fast_encoding": "float16"}, {"hu_window": (100, -100)},
     {"series_layout": "tree"}, {"cases_dir": "a/b"}],
)  # fmt: skip
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(P.PreparationError):
        P.PrepareSettings(**kwargs)


def test_split_file_decides_the_splits(raw, tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({
        "train": [{"image": "ct_case/000001/Axial.npy", "text": "ct_case/000001/text.txt"}],
        "validation": ["ct_case/000002"],
        "test": ["ct_case/000003"],
    }))  # fmt: skip
    out = tmp_path / "M3D"
    summary = P.prepare_dataset(raw, out, P.PrepareSettings(shape=SMALL, formats=("nii.gz",)),
                                P.SplitRule(file=str(split_file)), workers=1, progress=False)  # fmt: skip
    cap = json.loads((out / layout.CAP_JSON).read_text())
    cases = {split: sorted({e["image"].split("/")[1] for e in entries}) for split, entries in cap.items()}
    assert cases == {"train": ["000001"], "validation": ["000002"], "test": ["000003"]}
    assert any("ct_case/hu_case: not in split.file" in p for p in summary.problems)


def test_folder_layout_and_npy_format(tmp_path, raw):
    out = tmp_path / "M3D"
    settings = P.PrepareSettings(shape=SMALL, formats=("nii.gz", "npy"), series_layout="folder")
    P.prepare_dataset(raw, out, settings, EVERY_CASE_TO_TRAIN, workers=1, progress=False)
    nifti = load_volume(out / "ct_case/000003/Axial/volume.nii.gz")
    array = np.load(out / "ct_case/000003/Axial/volume.npy")
    assert array.shape == (1, *SMALL) and array.dtype == np.float32
    np.testing.assert_array_equal(array, nifti)


def test_command_line_prepares_and_reports(raw, tmp_path):
    out, run_dir = tmp_path / "M3D", tmp_path / "run"
    command = [
        sys.executable, "-m", "med3dvlm.prepare", f"raw_dir={raw}", f"out_dir={out}", "shape=[6,8,8]",
        "workers=1", "progress=false", f"hydra.run.dir={run_dir}", "split.fractions=[1,0,0]",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # two cases of the tree fail by design
    assert "6 cases: 4 done, 0 skipped (done before), 2 failed" in result.stdout
    saved = json.loads((run_dir / "prepare_summary.json").read_text(encoding="utf-8"))
    assert saved["counts"] == {"prepared": 4, "skipped": 0, "failed": 2}
    assert len(json.loads((out / layout.CAP_JSON).read_text())["train"]) == 5
    result = subprocess.run([*command[:3], f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "nothing to do" in result.stderr


def test_composed_config_runs(raw, tmp_path):
    cfg = compose_config(
        "prepare",
        [f"raw_dir={raw}", f"out_dir={tmp_path / 'M3D'}", "shape=[6,8,8]", "workers=1", "progress=false",
         "formats=[nii.gz]", "hu_window=null"],
        tmp_path,
    )  # fmt: skip
    summary = P.run_from_config(cfg)
    assert len(summary.of("prepared")) == 4
    assert (tmp_path / "run" / "prepare_summary.json").is_file()
    assert not list((tmp_path / "M3D").rglob("*.nii"))  # only the listed format
