"""Realistic CT files written by the tests: DICOM series as scanners write them, and HU NIfTI.

The DICOM files start from a real CT slice that pydicom ships (``CT_small.dcm``: GE header, CT Image
Storage, signed int16 stored values, ``RescaleIntercept`` -1024) and get the geometry, pixels and
identifiers of each slice. Patient fields hold recognisable strings (``PATIENT_MARKERS``) so tests can
check that none of them reaches an output or a log. File names are random hex without a suffix and
``InstanceNumber`` runs against the slice order, so a reader that sorts by either gets the volume wrong.
"""

from __future__ import annotations

import copy
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CT_SLOPE, CT_INTERCEPT = 1.0, -1024.0  # as the template and most CT scanners write them
# Identifying values written into every header; none may appear in any output.
PATIENT_MARKERS = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN-8675309",
    "PatientBirthDate": "19420713",
    "StudyDate": "20190311",
    "AccessionNumber": "ACC-55501",
    "InstitutionName": "St Example Hospital",
}
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # ImageOrientationPatient of an axial slice (LPS)


def template_dataset():
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))


def write_dicom_series(
    volume_hu: np.ndarray,
    folder: Path,
    spacing: Sequence[float] = (2.5, 0.7, 0.7),
    *,
    series_uid: str | None = None,
    series_number: int = 2,
    description: str = "AXIAL 2.5 SOFT",
    origin: Sequence[float] = (-120.0, -140.0, 40.0),
    tilt_degrees: float = 0.0,
    seed: int = 0,
    suffix: str = "",
    slope: float = CT_SLOPE,
    intercept: float = CT_INTERCEPT,
) -> list[Path]:
    """``volume_hu`` ``(D, H, W)`` (slices head to feet, rows front to back, columns right to left)
    as an axial DICOM series in ``folder``: one file per slice, returned in slice order.

    ``tilt_degrees`` tilts the image plane about the patient's left-right axis while the slices stay
    at table positions, as a gantry-tilted acquisition does.
    """
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    depth, rows, columns = volume_hu.shape
    slice_step, row_spacing, column_spacing = (float(s) for s in spacing)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    tilt = np.radians(tilt_degrees)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt))) if tilt_degrees else AXIAL
    instance_numbers = rng.permutation(depth) + 1  # against the slice order on purpose
    template = template_dataset()
    paths = []
    for k in range(depth):
        dataset = copy.deepcopy(template)
        for key, value in PATIENT_MARKERS.items():
            setattr(dataset, key, value)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            frame_uid,
        )
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.SeriesNumber, dataset.SeriesDescription = series_number, description
        dataset.InstanceNumber = int(instance_numbers[k])
        # slice k lies k steps towards the feet (LPS z decreases)
        dataset.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) - k * slice_step]
        dataset.ImageOrientationPatient = list(orientation)
        dataset.SliceLocation = float(origin[2]) - k * slice_step
        dataset.PixelSpacing = [row_spacing, column_spacing]
        dataset.SliceThickness = slice_step
        dataset.Rows, dataset.Columns = rows, columns
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
        stored = np.rint((volume_hu[k] - intercept) / slope)
        dataset.PixelData = np.clip(stored, -32768, 32767).astype("<i2").tobytes()
        path = folder / (rng.bytes(8).hex() + suffix)
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return archive


def write_hu_nifti(volume_hu: np.ndarray, path: Path, spacing: Sequence[float] = (2.5, 0.7, 0.7)) -> Path:
    """``volume_hu`` ``(D, H, W)`` in display order as NIfTI stored in RAS+ (as dcm2niix-style tools
    and nibabel default to), so the reader must reorient it back: columns go right->left in display
    order but left->right (R) in the file, rows front->back but back->front (A), slices head->feet but
    feet->head (S)."""
    import nibabel as nib

    d_step, h_step, w_step = (float(s) for s in spacing)
    display_xyz = volume_hu.transpose(2, 1, 0)  # (W, H, D): L, P, I
    ras = display_xyz[::-1, ::-1, ::-1]  # R, A, S
    affine = np.diag([w_step, h_step, d_step, 1.0])
    image = nib.Nifti1Image(np.ascontiguousarray(ras.astype(np.int16)), affine)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, path)
    return path


def phantom_hu(volume01: np.ndarray) -> np.ndarray:
    """A phantom volume in [0, 1] as the HU volume it stands for (``PHANTOM_HU_WINDOW``), on the integer HU grid."""
    from med3dvlm.data.phantoms import PHANTOM_HU_WINDOW

    lower, upper = PHANTOM_HU_WINDOW
    volume = np.asarray(volume01, dtype=np.float64)
    if volume.ndim == 4:
        volume = volume[0]
    return np.rint(lower + volume * (upper - lower)).astype(np.float32)
