"""Reading CT as users have it (``med3dvlm.data.ct.load_ct``): DICOM series written the way scanners
write them (``tests/ct_files.py``), their zip, and HU NIfTI stored in another orientation.

The reference is the HU volume the files were written from: a reader that sorts by file name or
InstanceNumber, forgets the rescale, or mixes up axes gets another array.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
from ct_files import PATIENT_MARKERS, phantom_hu, write_dicom_series, write_hu_nifti, zip_folder

from med3dvlm.data.ct import DicomSeriesError, SeveralSeriesError, list_series, load_ct
from med3dvlm.data.errors import CorruptFileError, MissingFileError

SPACING = (2.5, 0.7, 0.8)  # (D, H, W) mm: slice step, between rows, between columns


def hu_volume(seed: int = 0, shape=(12, 20, 24)) -> np.ndarray:
    """An integer-HU volume with air, soft tissue, bone, and a marker in the head/front/right corner."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    volume[0, 0, 0] = 3000.0
    return volume


@pytest.fixture(scope="module")
def truth():
    return hu_volume()


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory, truth):
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_dicom_series(truth, folder, SPACING)
    return folder


def test_dicom_series_is_ordered_by_position_and_rescaled(series_folder, truth):
    files = sorted(p.name for p in series_folder.iterdir())
    numbers = [int(pydicom.dcmread(series_folder / f, stop_before_pixels=True).InstanceNumber) for f in files]
    assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)  # neither order helps
    volume, spacing = load_ct(series_folder)
    assert volume.dtype == np.float32 and volume.shape == truth.shape
    np.testing.assert_array_equal(volume, truth)
    assert volume[0, 0, 0] == 3000.0  # head, front, patient's right
    np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)


def test_slope_and_intercept_are_applied_per_file(tmp_path, truth):
    folder = tmp_path / "series"
    write_dicom_series(truth, folder, SPACING, slope=0.5, intercept=-2048.0)
    stored = pydicom.dcmread(next(folder.iterdir())).pixel_array
    assert stored.min() >= 0  # stored values are not HU
    np.testing.assert_array_equal(load_ct(folder).volume, truth)


def test_zip_and_hu_nifti_give_the_same_volume(tmp_path, series_folder, truth):
    archive = zip_folder(series_folder, tmp_path / "series.zip")
    zipped, zipped_spacing = load_ct(archive)
    np.testing.assert_array_equal(zipped, truth)
    nifti = write_hu_nifti(truth, tmp_path / "scan.nii.gz", SPACING)  # stored RAS: every axis flipped
    from_nifti, nifti_spacing = load_ct(nifti)
    np.testing.assert_array_equal(from_nifti, truth)
    np.testing.assert_allclose(nifti_spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(zipped_spacing, SPACING, rtol=1e-6)


def test_files_with_dcm_suffix_in_subfolders_and_stray_files(tmp_path, truth):
    folder = tmp_path / "export"
    write_dicom_series(truth, folder / "DICOM" / "S0001", SPACING, suffix=".dcm")
    (folder / "README.txt").write_text("exported by a PACS viewer")
    np.testing.assert_array_equal(load_ct(folder).volume, truth)


def test_several_series_are_listed_and_one_is_chosen(tmp_path, truth):
    folder = tmp_path / "study"
    other = truth[:, ::-1, :].copy()
    write_dicom_series(truth, folder, SPACING, series_number=2, description="AXIAL SOFT", seed=1)
    write_dicom_series(other[:7], folder, SPACING, series_number=5, description="AXIAL BONE", seed=2)
    with pytest.raises(SeveralSeriesError) as caught:
        load_ct(folder)
    message = str(caught.value)
    assert "2 image series" in message and "series=" in message
    assert "'AXIAL SOFT', 12 slices" in message and "'AXIAL BONE', 7 slices" in message
    infos = {info.description: info for info in list_series(folder)}
    assert {info.uid for info in caught.value.series} == {infos["AXIAL SOFT"].uid, infos["AXIAL BONE"].uid}
    np.testing.assert_array_equal(load_ct(folder, series=infos["AXIAL SOFT"].uid).volume, truth)
    np.testing.assert_array_equal(load_ct(folder, series="5").volume, other[:7])  # by SeriesNumber
    with pytest.raises(DicomSeriesError, match="series=9 matches no"):
        load_ct(folder, series="9")


def test_a_missing_slice_is_refused_naming_the_gap(tmp_path, truth):
    folder = tmp_path / "series"
    files = write_dicom_series(truth, folder, SPACING)
    files[5].unlink()
    with pytest.raises(DicomSeriesError, match="a slice is missing") as caught:
        load_ct(folder)
    assert files[4].name in str(caught.value) and files[6].name in str(caught.value)
    assert "5 mm between" in str(caught.value)


def test_gantry_tilt_is_refused(tmp_path, truth):
    folder = tmp_path / "tilted"
    write_dicom_series(truth, folder, SPACING, tilt_degrees=15.0)
    with pytest.raises(DicomSeriesError, match=r"gantry tilt of 15\.0 degrees"):
        load_ct(folder)
    # a hair of tilt (rounding in the header) is not tilt
    write_dicom_series(truth, tmp_path / "straight", SPACING, tilt_degrees=0.05)
    assert load_ct(tmp_path / "straight").volume.shape == truth.shape


def test_a_slice_of_another_size_is_named(tmp_path, truth):
    folder = tmp_path / "series"
    files = write_dicom_series(truth, folder, SPACING)
    odd = pydicom.dcmread(files[3])
    odd.Rows, odd.Columns = 10, 10
    odd.PixelData = np.zeros((10, 10), "<i2").tobytes()
    odd.save_as(files[3])
    with pytest.raises(DicomSeriesError, match=f"{files[3].name}: slice of 10 x 10 pixels in a series of 20 x 24"):
        load_ct(folder)


def test_a_file_without_pixel_data_is_named(tmp_path, truth):
    folder = tmp_path / "series"
    files = write_dicom_series(truth, folder, SPACING)
    empty = pydicom.dcmread(files[2])
    del empty.PixelData
    empty.save_as(files[2])
    with pytest.raises(DicomSeriesError, match=f"{files[2].name}: holds no pixel data"):
        load_ct(folder)


def test_an_unsupported_compression_is_named(tmp_path, truth):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    folder = tmp_path / "series"
    files = write_dicom_series(truth, folder, SPACING)
    compressed = pydicom.dcmread(files[0])
    compressed.file_meta.TransferSyntaxUID = JPEGLSLossless
    compressed.PixelData = encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    compressed["PixelData"].VR = "OB"
    compressed.save_as(files[0], enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=f"{files[0].name}: pixel data compressed as JPEG-LS Lossless"):
        load_ct(folder)


def test_missing_corrupt_and_empty_inputs(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere"):
        load_ct(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomSeriesError, match="no DICOM file found"):
        load_ct(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"PK not a zip")
    with pytest.raises(CorruptFileError, match="bad.zip: not a readable zip"):
        load_ct(tmp_path / "bad.zip")


def test_a_truncated_file_is_named(tmp_path, truth):
    folder = tmp_path / "series"
    files = write_dicom_series(truth, folder, SPACING)
    data = files[4].read_bytes()
    files[4].write_bytes(data[: len(data) - 200])  # cut inside the pixel data, as an interrupted copy does
    with pytest.raises(DicomSeriesError, match=f"{files[4].name}: cannot decode pixel data"):
        load_ct(folder)


def test_no_patient_identifier_reaches_a_message_or_log(tmp_path, truth, caplog):
    folder = tmp_path / "study"
    write_dicom_series(truth, folder, SPACING, seed=1)
    write_dicom_series(truth[:4], folder, SPACING, seed=2, series_number=7)
    shutil.copy(folder / next(iter(sorted(p.name for p in folder.iterdir()))), folder / "notes.txt")
    (folder / "notes.txt").write_text("not dicom")
    texts = []
    with caplog.at_level(logging.DEBUG):
        for call in (lambda: load_ct(folder), lambda: load_ct(folder, series="99")):
            with pytest.raises(DicomSeriesError) as caught:
                call()
            texts.append(str(caught.value))
        texts += [info.line() for info in list_series(folder)]
    texts.append(caplog.text)
    for value in PATIENT_MARKERS.values():
        assert all(value not in text for text in texts), value


def test_phantom_round_trip_through_dicom(tmp_path):
    """A phantom written as HU (PHANTOM_HU_WINDOW) comes back as the same integers."""
    from med3dvlm.data import make_phantom_dataset
    from med3dvlm.data.volumes import load_volume

    dataset = make_phantom_dataset(tmp_path / "phantoms", num_cases=3, shape=(16, 32, 32))
    volume = load_volume(next((dataset.root / "ct_case").rglob("volume.nii.gz")))
    hu = phantom_hu(volume)
    assert hu.min() == -1000.0 and hu.max() > 0  # air and tissue
    write_dicom_series(hu, tmp_path / "series", (2.0, 0.9, 0.9))
    np.testing.assert_array_equal(load_ct(tmp_path / "series").volume, hu)


@pytest.mark.parametrize(
    "axes, flips, oblique_degrees, slope, intercept, suffix",
    [
        ((0, 1, 2), (1, 1, 1), 0.0, 1.0, 0.0, ".nii.gz"),
        ((2, 0, 1), (-1, 1, -1), 0.0, 1.0, -1024.0, ".nii.gz"),
        ((1, 2, 0), (1, -1, 1), 12.0, 0.5, -1000.0, ".nii"),
        ((0, 2, 1), (-1, -1, -1), 30.0, 2.0, 0.0, ".nii.gz"),
    ],
)
def test_nifti_reorientation_equals_nibabels_as_reoriented(
    tmp_path, axes, flips, oblique_degrees, slope, intercept, suffix
):
    """Any axis order, flip, oblique affine and rescale: ``load_ct`` (views of the decoded array, one
    copy) gives nibabel's own ``as_reoriented(...).get_fdata()`` and its zooms."""
    import nibabel as nib
    from nibabel import orientations

    from med3dvlm.data.ct import DISPLAY_AXCODES

    rng = np.random.default_rng(3)
    stored = rng.integers(-1200, 3000, size=(7, 9, 11)).astype(np.int16)
    angle = np.radians(oblique_degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    linear = np.zeros((3, 3))
    for axis, (world, flip) in enumerate(zip(axes, flips)):
        linear[world, axis] = flip * (0.6 + 0.4 * axis)  # voxel sizes 0.6, 1.0, 1.4 mm
    affine = np.eye(4)
    affine[:3, :3] = rotation @ linear
    affine[:3, 3] = (-40.0, 12.5, 80.0)
    image = nib.Nifti1Image(stored[..., np.newaxis] if suffix == ".nii" else stored, affine)
    image.header.set_slope_inter(slope, intercept)
    path = tmp_path / f"scan{suffix}"
    nib.save(image, path)

    volume, spacing = load_ct(path)

    saved = nib.load(path)
    transform = orientations.ornt_transform(
        orientations.io_orientation(saved.affine), orientations.axcodes2ornt(DISPLAY_AXCODES)
    )
    reference = saved.as_reoriented(transform)
    expected = np.squeeze(reference.get_fdata(), axis=3) if reference.ndim == 4 else reference.get_fdata()
    assert volume.shape == expected.shape[::-1] and volume.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(volume, expected.transpose(2, 1, 0), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(spacing, reference.header.get_zooms()[:3][::-1], rtol=1e-5)
    as_stored = stored.transpose(2, 1, 0) * slope + intercept
    if axes != (0, 1, 2) or flips != (-1, -1, -1):  # the file's axes are not already L, P, I
        assert volume.shape != as_stored.shape or not np.allclose(volume, as_stored)
