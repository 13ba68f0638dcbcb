"""The fast volume format: uncompressed NIfTI with integer voxels and a scale, read transparently.

References are independent of the reader: nibabel's own ``get_fdata`` (which applies the header's
``scl_slope`` / ``scl_inter``), and ``round(v * levels) / levels`` computed here in float64.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra_helpers import compose_config

from med3dvlm.data import (
    CorruptFileError,
    M3DCapDataModule,
    MissingFileError,
    UnknownFormatError,
    layout,
    load_volume,
    read_cap_json,
    read_task_split,
    save_volume,
)
from med3dvlm.data import prepare as P
from med3dvlm.data.volumes import ENCODING_LEVELS, with_volume_format

REPO = Path(__file__).resolve().parents[1]


def random_volume(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("encoding", ["uint8", "int16"])
def test_integer_encoding_stores_steps_and_scale(tmp_path, encoding):
    volume = random_volume()
    volume[0, 0, :2] = [0.0, 1.0]  # both ends of the range
    path = save_volume(volume, tmp_path / "v.nii", encoding=encoding)
    levels = ENCODING_LEVELS[encoding]
    image = nib.load(path)
    assert image.get_data_dtype() == np.dtype(encoding)
    with path.open("rb") as handle:  # the header as stored (a loaded image moves the scale to dataobj)
        header = nib.Nifti1Header.from_fileobj(handle)
    assert float(header["scl_slope"]) == pytest.approx(1 / levels, rel=1e-7) and float(header["scl_inter"]) == 0
    raw = np.asanyarray(image.dataobj.get_unscaled())  # file order (x, y, z) = (W, H, D)
    np.testing.assert_array_equal(raw, np.rint(volume.astype(np.float64) * levels).transpose(2, 1, 0))
    loaded = load_volume(path)
    assert loaded.dtype == np.float32 and loaded.shape == (1, *volume.shape) and loaded.flags.c_contiguous
    np.testing.assert_allclose(loaded[0], np.rint(volume.astype(np.float64) * levels) / levels, rtol=0, atol=1e-7)
    assert np.abs(loaded[0] - volume).max() <= 0.5 / levels + 1e-7
    assert loaded.min() == 0.0 and loaded.max() == 1.0


def test_uncompressed_nifti_with_any_scale_matches_nibabel(tmp_path):
    """A .nii written by nibabel itself, int16 with slope 0.5 and intercept -3, 4D with a trailing 1."""
    data = np.random.default_rng(1).integers(-500, 500, size=(7, 6, 5, 1)).astype(np.int16)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, -3.0)
    nib.save(image, tmp_path / "scaled.nii")
    expected = nib.load(tmp_path / "scaled.nii").get_fdata()[..., 0].transpose(2, 1, 0)
    np.testing.assert_allclose(load_volume(tmp_path / "scaled.nii")[0], expected, rtol=1e-6)


def test_float32_nii_is_the_gunzipped_nii_gz(tmp_path):
    volume = random_volume(seed=2)
    save_volume(volume, tmp_path / "v.nii.gz")
    (tmp_path / "v.nii").write_bytes(nib.load(tmp_path / "v.nii.gz").to_bytes())
    np.testing.assert_array_equal(load_volume(tmp_path / "v.nii"), load_volume(tmp_path / "v.nii.gz"))


def test_loaded_volume_is_not_tied_to_the_file(tmp_path):
    path = save_volume(random_volume(), tmp_path / "v.nii", encoding="uint8")
    first = load_volume(path)
    first += 1  # writable, and a change must not reach the file
    path.unlink()  # nor is the file still needed
    assert first.min() >= 1.0


@pytest.mark.parametrize("encoding", ["uint8", "int16"])
def test_truncated_fast_file_is_a_corrupt_file(tmp_path, encoding):
    path = save_volume(random_volume(), tmp_path / "v.nii", encoding=encoding)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 50])
    with pytest.raises(CorruptFileError, match="v.nii"):
        load_volume(path)


def test_integer_encodings_refuse_what_they_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 .* spans \[0\.\d+, 1\.99"):
        save_volume(random_volume() * 2, tmp_path / "v.nii", encoding="uint8")
    volume = random_volume()
    volume[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="uint8"):
        save_volume(volume, tmp_path / "v.nii", encoding="uint8")
    with pytest.raises(ValueError, match="float32"):
        save_volume(random_volume(), tmp_path / "v.npy", encoding="uint8")
    with pytest.raises(ValueError, match="encoding"):
        save_volume(random_volume(), tmp_path / "v.nii", encoding="float16")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


@pytest.mark.parametrize(
    ("listed", "volume_format", "expected"),
    [
        ("a/b/x.nii.gz", "nii", "a/b/x.nii"),
        ("a/x.NII.GZ", "nii", "a/x.nii"),
        ("x.npy", "nii.gz", "x.nii.gz"),
        ("x.nii", ".npy", "x.npy"),
        ("x.nii.gz", None, "x.nii.gz"),
        ("x.mha", None, "x.mha"),  # as listed: no suffix check here, load_volume reports it
    ],
)
def test_with_volume_format(listed, volume_format, expected):
    assert with_volume_format(listed, volume_format) == Path(expected)


def test_with_volume_format_rejects_unknown_names():
    with pytest.raises(ValueError, match="volume_format"):
        with_volume_format("x.nii.gz", "mha")
    with pytest.raises(UnknownFormatError, match="x.mha"):
        with_volume_format("x.mha", "nii")


# ----------------------------------------------------------------------------------------------
# Readers, DataModules and the converter
# ----------------------------------------------------------------------------------------------


def test_readers_name_a_missing_fast_copy(tiny_m3d_root):
    with pytest.raises(MissingFileError) as info:
        read_cap_json(tiny_m3d_root, "train", volume_format="nii")
    message = str(info.value)
    assert "M3D_Cap.json: train[0]" in message and "case0.nii not found" in message
    assert "case0.nii.gz" in message and "python -m med3dvlm.prepare convert=" in message
    with pytest.raises(ValueError, match="volume_format"):
        M3DCapDataModule(tiny_m3d_root, volume_format="nifti")


def test_convert_then_read_transparently(tiny_m3d_root):
    summary = P.convert_dataset(tiny_m3d_root, workers=1, progress=False)
    assert summary.exit_code == 0 and len(summary.of("prepared")) == 8, summary.text()
    # case 1 is listed as M3D's .npy: it gets a .nii.gz and a fast .nii; the others a .nii
    assert (tiny_m3d_root / "volumes/case1.nii.gz").is_file() and (tiny_m3d_root / "volumes/case1.nii").is_file()
    for task in ("caption", "vqa_closed", "vqa_open", "vqa_yes_no"):
        for split in layout.CAP_SPLITS:
            listed = read_task_split(tiny_m3d_root, task, split)
            fast = read_task_split(tiny_m3d_root, task, split, volume_format="nii")
            assert [s.image_path for s in fast.samples] == [
                s.image_path.with_name(s.image_path.name.split(".")[0] + ".nii") for s in listed.samples
            ]
            assert [(s.prompt, s.answer) for s in fast.samples] == [(s.prompt, s.answer) for s in listed.samples]
    batches = {}
    for volume_format in (None, "nii"):
        datamodule = M3DCapDataModule(tiny_m3d_root, batch_size=4, volume_format=volume_format, seed=0)
        datamodule.setup("test")
        batches[volume_format] = next(iter(datamodule.test_dataloader()))
    assert batches["nii"]["answer"] == batches[None]["answer"]
    np.testing.assert_allclose(batches["nii"]["image"], batches[None]["image"], atol=0.5 / 255 + 1e-7)
    assert not np.array_equal(batches["nii"]["image"], batches[None]["image"])  # really the other files


def test_convert_is_resumable_and_reports_failures(tiny_m3d_root):
    first = P.convert_dataset(tiny_m3d_root, formats=("nii.gz", "nii"), workers=1, progress=False)
    assert len(first.of("prepared")) == 8
    again = P.convert_dataset(tiny_m3d_root, workers=1, progress=False)
    assert len(again.of("skipped")) == 8 and not again.of("prepared")
    # a lost copy is redone; a volume the uint8 encoding cannot hold fails, named with the reason
    (tiny_m3d_root / "volumes/case3.nii").unlink()
    (tiny_m3d_root / "volumes/case4.nii").unlink()
    save_volume(random_volume((8, 16, 16)) * 3, tiny_m3d_root / "volumes/case4.nii.gz")
    third = P.convert_dataset(tiny_m3d_root, workers=2, progress=False)
    assert [r.key for r in third.of("prepared")] == [str(tiny_m3d_root / "volumes/case3.nii.gz")]
    [failed] = third.of("failed")
    assert failed.key.endswith("case4.nii.gz") and "uint8" in failed.reason and third.exit_code == 1
    assert not (tiny_m3d_root / "volumes/case4.nii").exists()


def test_convert_from_the_composed_config(tiny_m3d_root, tmp_path):
    cfg = compose_config("prepare", [f"convert={tiny_m3d_root}", "workers=1", "progress=false",
                                     "formats=[nii.gz,nii]", "fast_encoding=int16"], tmp_path)  # fmt: skip
    summary = P.run_from_config(cfg)
    assert len(summary.of("prepared")) == 8
    assert nib.load(tiny_m3d_root / "volumes/case0.nii").get_data_dtype() == np.int16
    saved = json.loads((tmp_path / "run" / "prepare_summary.json").read_text(encoding="utf-8"))
    assert saved["counts"]["prepared"] == 8


def test_fast_copy_loads_faster_than_nii_gz(tmp_path):
    """A loose floor (the benchmark measures the real ratio): at least 3x, best of 5 reads each."""
    shape = (32, 128, 128)
    volume = P.crop_and_resize(random_volume((24, 96, 96), seed=4) + 0.01, shape, "test")
    slow = save_volume(volume, tmp_path / "v.nii.gz")
    fast = save_volume(volume, tmp_path / "v.nii", encoding="uint8")

    def best_time(path: Path) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            load_volume(path)
            times.append(time.perf_counter() - start)
        return min(times)

    assert best_time(slow) > 3 * best_time(fast)


@pytest.mark.slow
def test_benchmark_runs_and_prints_the_ratio(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_data.py"), "--volumes", "2", "--shape", "16", "32", "32",
         "--repeats", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "nii.gz float32 (prepared)" in lines and "nii uint8 (fast, default)" in lines
    assert "1.0x" in lines["nii.gz float32 (prepared)"] and "cold cache" in result.stdout
    assert not list(tmp_path.iterdir())  # its files are removed
