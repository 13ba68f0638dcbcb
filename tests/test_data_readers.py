"""Readers and volume I/O on valid data; expected strings are SPEC §6 written out literally."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from med3dvlm.data import (
    load_volume,
    read_cap_json,
    read_task_split,
    read_vqa_csv,
    read_vqa_yes_no_csv,
    save_volume,
)
from med3dvlm.data.m3d import parse_question_type

# ------------------------------------------------------------------ volumes


def test_nifti_is_transposed_from_file_xyz_to_dhw(tmp_path):
    xyz = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)  # (x, y, z) = (W, H, D)
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(xyz, affine=np.eye(4)), path)

    volume = load_volume(path)

    assert volume.shape == (1, 4, 5, 6)
    assert volume.dtype == np.float32
    for d, h, w in [(0, 0, 0), (3, 1, 5), (2, 4, 1)]:
        assert volume[0, d, h, w] == xyz[w, h, d]


def test_nifti_with_trailing_singleton_axis_is_accepted(tmp_path):
    xyzt = np.random.default_rng(0).random((6, 5, 4, 1), dtype=np.float32)
    path = tmp_path / "volume.nii"
    nib.save(nib.Nifti1Image(xyzt, affine=np.eye(4)), path)
    assert np.array_equal(load_volume(path)[0], xyzt[..., 0].transpose(2, 1, 0))


@pytest.mark.parametrize("shape", [(4, 5, 6), (1, 4, 5, 6)])
def test_npy_accepts_dhw_and_channel_first(tmp_path, shape):
    array = np.random.default_rng(0).random(shape).astype(np.float64)
    path = tmp_path / "volume.npy"
    np.save(path, array)
    volume = load_volume(path)
    assert volume.shape == (1, 4, 5, 6) and volume.dtype == np.float32
    assert np.allclose(volume.reshape(-1), array.reshape(-1))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".npy"])
@pytest.mark.parametrize("channel_first", [False, True])
def test_save_volume_round_trips(tmp_path, suffix, channel_first):
    dhw = np.random.default_rng(1).random((4, 5, 6), dtype=np.float32)
    path = tmp_path / "sub" / f"volume{suffix}"
    save_volume(dhw[None] if channel_first else dhw, path)
    save_volume(dhw, path)  # overwriting goes through the same atomic replace
    assert np.array_equal(load_volume(path), dhw[None])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind


def test_saved_nifti_stores_released_xyz_layout(tmp_path):
    path = save_volume(np.zeros((4, 5, 6), dtype=np.float32), tmp_path / "volume.nii.gz")
    assert nib.load(path).shape == (6, 5, 4)


# ------------------------------------------------------------------ M3D-Cap


def test_read_cap_json(tiny_m3d_root):
    result = read_cap_json(tiny_m3d_root, "train")

    assert result.skipped == []
    assert [s.source for s in result.samples] == [f"M3D_Cap.json:train[{i}]" for i in range(4)]
    first = result.samples[0]
    assert first.image_path == tiny_m3d_root / "volumes/case0.nii.gz"
    assert first.answer == "Findings for case 0. Liver normal."
    assert first.prompt == "Describe the findings of this medical image."
    assert first.task == "caption"
    assert first.question_type is None and first.answer_choice is None
    assert result.samples[1].image_path == tiny_m3d_root / "volumes/case1.npy"
    assert len(read_cap_json(tiny_m3d_root, "validation").samples) == 2


# ------------------------------------------------------------------ M3D-VQA


def test_read_vqa_closed_follows_spec_format(tiny_m3d_root):
    result = read_vqa_csv(tiny_m3d_root / "M3D-VQA/M3D_VQA_train.csv", tiny_m3d_root, "closed")

    assert len(result.samples) == 8 and result.skipped == []
    plane, organ = result.samples[:2]
    assert plane.prompt == "What plane is this? Choices: A. Axial B. Coronal C. Sagittal D. Oblique"
    assert plane.answer == "A. Axial"
    assert plane.answer_choice == "A"
    assert plane.question_type == "Plane"
    assert plane.task == "vqa_closed"
    assert plane.source == "M3D_VQA_train.csv:row 2"
    assert plane.image_path == tiny_m3d_root / "volumes/case0.nii.gz"
    assert organ.prompt == "Which organ is abnormal? Choices: A. Liver B. Kidney C. Spleen D. Lung"
    assert organ.answer == "B. Kidney"
    assert organ.question_type == "Organ"
    assert organ.source == "M3D_VQA_train.csv:row 3"


def test_read_vqa_open_uses_question_and_answer_text(tiny_m3d_root):
    result = read_vqa_csv(tiny_m3d_root / "M3D-VQA/M3D_VQA_train.csv", tiny_m3d_root, "open")

    plane = result.samples[0]
    assert plane.prompt == "What plane is this?"
    assert plane.answer == "Axial"
    assert plane.task == "vqa_open"
    assert plane.answer_choice is None
    assert plane.question_type == "Plane"


def test_read_vqa_yes_no_normalises_answers(tiny_m3d_root):
    result = read_vqa_yes_no_csv(tiny_m3d_root / "M3D-VQA/M3D_VQA_yn_train.csv", tiny_m3d_root)

    assert [s.answer for s in result.samples] == ["Yes", "No", "Yes", "No"]
    assert {s.prompt for s in result.samples} == {"Is there a lesion?"}
    assert {s.task for s in result.samples} == {"vqa_yes_no"}
    assert {s.question_type for s in result.samples} == {"Abnormality"}


@pytest.mark.parametrize(
    "value, name",
    [
        ("1", "Plane"),
        ("2", "Phase"),
        ("3.0", "Organ"),
        (" 4 ", "Abnormality"),
        ("5", "Location"),
        ("location", "Location"),
    ],
)
def test_question_type_accepts_numbers_and_names(value, name):
    assert parse_question_type(value, "file.csv: row 2") == name


@pytest.mark.parametrize(
    "task, split, expected_source",
    [
        ("caption", "test", "M3D_Cap.json:test[0]"),
        ("vqa_closed", "validation", "M3D_VQA_val.csv:row 2"),
        ("vqa_open", "test", "M3D_VQA_test.csv:row 2"),
        ("vqa_yes_no", "validation", "M3D_VQA_yn_val.csv:row 2"),
    ],
)
def test_read_task_split_finds_each_file(tiny_m3d_root, task, split, expected_source):
    result = read_task_split(tiny_m3d_root, task, split)
    assert result.samples[0].source == expected_source
    assert {s.task for s in result.samples} == {task}


@pytest.mark.parametrize(
    "kind", ["nifti1", "nifti2", "big_endian", "extension", "no_scaling", "two_gzip_members", "without_deflate"]
)
def test_compressed_nifti_read_in_one_piece_equals_nibabels_own_read(kind, tmp_path, monkeypatch):
    """``read_stored_nifti`` decompresses a ``.nii.gz`` in memory (libdeflate when installed) and
    views its voxels in place: the same voxels, scaling, affine and voxel sizes as ``nibabel.load``
    for every NIfTI flavour a converter writes (a header extension moves where the voxels start)."""
    import gzip
    import sys

    import nibabel as nib

    from med3dvlm.data.volumes import read_stored_nifti, rescaled_float32

    rng = np.random.default_rng(3)
    stored = rng.integers(-1024, 2000, size=(9, 7, 5)).astype(np.int16)
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    image_class = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    header = nib.Nifti1Header(endianness=">") if kind == "big_endian" else None
    image = image_class(stored, affine, header)
    if kind != "no_scaling":
        image.header.set_slope_inter(1.0, -1024.0)
    if kind == "extension":  # e.g. dcm2niix's or AFNI's, between the header and the voxels
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"converted by a scanner tool " * 9))
    path = tmp_path / "scan.nii.gz"
    nib.save(image, path)
    first_field = gzip.decompress(path.read_bytes())[:4]
    assert first_field == (
        (540).to_bytes(4, "little")
        if kind == "nifti2"
        else (348).to_bytes(4, "big" if kind == "big_endian" else "little")
    )
    if kind == "two_gzip_members":  # concatenated members, as some tools write: one stream to the reader
        body = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(body[:200]) + gzip.compress(body[200:]))
    if kind == "without_deflate":
        monkeypatch.setitem(sys.modules, "deflate", None)  # the zlib fallback
    expected = nib.load(path)
    if kind == "extension":
        assert expected.dataobj.offset > 352
    read = read_stored_nifti(path)
    assert read.stored.shape == expected.shape and read.stored.dtype == expected.get_data_dtype()
    np.testing.assert_array_equal(
        rescaled_float32(read.stored, read.slope, read.intercept), expected.get_fdata(dtype=np.float32)
    )
    np.testing.assert_array_equal(read.affine, expected.affine)
    assert read.zooms == expected.header.get_zooms()
    assert rescaled_float32(read.stored, read.slope, read.intercept).min() < (-1000 if kind != "no_scaling" else 0)


def test_compressed_nifti_voxels_are_held_once_while_reading(tmp_path):
    """A CT of 512 x 512 x 600 is 300 MB of int16 once inflated; reading it must not hold a second
    copy of those bytes (nibabel's ``from_bytes`` did: a ``BytesIO``, then the array; peak 2x)."""
    import tracemalloc

    import nibabel as nib

    from med3dvlm.data.volumes import read_stored_nifti

    stored = np.zeros((96, 96, 64), np.int16)  # compresses to almost nothing: the peak is the inflated copies
    stored[20:70, 30:60, 10:50] = 40
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(stored, np.eye(4)), path)
    tracemalloc.start()
    try:
        read = read_stored_nifti(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(read.stored, stored)
    assert stored.nbytes <= peak < 1.3 * stored.nbytes


def test_compressed_nifti_short_of_its_voxels_is_named(tmp_path):
    """A ``.nii.gz`` whose gzip stream is sound but holds fewer voxels than its header states (cut
    before compressing): an error naming the file and saying how much is missing, from both readers."""
    import gzip

    import nibabel as nib

    from med3dvlm.data.ct import load_ct
    from med3dvlm.data.errors import CorruptFileError

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), path)
    body = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(body[:-2]))
    for read in (load_volume, load_ct):
        with pytest.raises(CorruptFileError, match=f"scan.nii.gz.*expected {len(body)} bytes .* holds {len(body) - 2}"):
            read(path)


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "wrong_crc", "wrong_size"])
@pytest.mark.parametrize("with_deflate", [True, False])
def test_a_damaged_compressed_nifti_is_named(damage, with_deflate, tmp_path, monkeypatch):
    """Every way a ``.nii.gz`` can be damaged is an error naming the file, with libdeflate's one-call
    path and without libdeflate; never a volume read from part of the data."""
    import sys

    import nibabel as nib

    from med3dvlm.data.ct import load_ct
    from med3dvlm.data.errors import CorruptFileError

    rng = np.random.default_rng(4)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(-1024, 2000, size=(16, 16, 8)).astype(np.int16), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "flipped_byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "wrong_crc":
        data[-8] ^= 0xFF
    else:  # ISIZE that the inflated data does not have
        data[-4:] = (int.from_bytes(data[-4:], "little") + 2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    if not with_deflate:
        monkeypatch.setitem(sys.modules, "deflate", None)
    for read in (load_volume, load_ct):
        with pytest.raises(CorruptFileError, match="scan.nii.gz"):
            read(path)


def test_a_single_member_gzip_is_inflated_in_one_call(tmp_path, monkeypatch):
    """The usual ``.nii.gz`` (one member) never takes the general path, which is 2.5x slower; two
    members do, and so does a trailer stating an impossible size."""
    import gzip

    from med3dvlm.data.volumes import _gunzip

    body = np.random.default_rng(5).integers(0, 50, size=100_000).astype(np.int16).tobytes()
    one_member = gzip.compress(body)
    two_members = gzip.compress(body[:1000]) + gzip.compress(body[1000:])
    general_path = gzip.decompress
    calls = []
    monkeypatch.setattr(gzip, "decompress", lambda data: calls.append(len(data)) or general_path(data))
    assert _gunzip(one_member) == body and calls == []
    assert _gunzip(two_members) == body and calls == [len(two_members)]
    huge = one_member[:-4] + (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(gzip.BadGzipFile):
        _gunzip(huge)
    assert len(calls) == 2
