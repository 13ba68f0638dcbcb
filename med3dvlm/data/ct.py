"""Reading CT as users have it: NIfTI in Hounsfield units, a DICOM series folder, or a ``.zip`` of one.

    volume, spacing = load_ct("scan.nii.gz")        # or a folder of .dcm files, or series.zip
    volume, spacing = load_ct("study/", series="1.2.840...")   # a folder holding several series

``volume`` is ``(D, H, W)`` float32 in HU (the stored values with ``RescaleSlope`` / ``RescaleIntercept``
applied), in display order: slices head to feet, rows front to back, columns patient right to left
(file axes ``L, P, I``, as ``prepare`` orients NIfTI); ``spacing`` is the voxel size in mm, ``(D, H, W)``.

DICOM is read with pydicom, one file per slice (CT Image Storage and other single-frame images):

* the slices of a series are ordered by their position along the slice normal
  (``ImagePositionPatient`` · (row × column direction)), never by file name or ``InstanceNumber``;
* the pixels become HU with pydicom's modality LUT (slope and intercept, per slice);
* the geometry (orientation, pixel spacing, slice positions) becomes a NIfTI affine, and the volume
  is reoriented exactly as a NIfTI file is, so a scan gives the same array either way.

Refused with an error naming the file (never guessed around): several image series in one folder
(the error lists them: choose one with ``series=``), a missing slice or uneven spacing, gantry tilt
(slices not stacked along their normal), slices of different sizes or orientations, a file without
pixel data, multi-frame files, and compressed transfer syntaxes no installed decoder reads. Resample
a tilted or gappy series with a dedicated converter (e.g. ``dcm2niix``) and give the NIfTI instead.
No header field that identifies a patient (names, IDs, dates) is read into a message or a log.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from med3dvlm.data.errors import CorruptFileError, DataError, MissingFileError, NonFiniteValuesError, VolumeShapeError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ZIP_SUFFIX = ".zip"
# File axes (x, y, z) = (W, H, D) after reorienting: columns run to the patient's left, rows to the
# back, slices to the feet, i.e. axial slices as radiologists view them.
DISPLAY_AXCODES = ("L", "P", "I")
# Slice positions may differ from an even grid by this fraction of the median spacing (scanners
# write positions rounded to ~0.01 mm); more is a missing slice or an uneven series.
SPACING_TOLERANCE = 0.1
# The step between slices may leave the slice normal by this angle (degrees) before it is gantry tilt.
TILT_TOLERANCE_DEGREES = 0.5
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of two slices of one series agree to this
# A zip of one series is read in memory; a larger uncompressed total is refused (zip bombs).
MAX_ZIP_UNCOMPRESSED_BYTES = 8 * 1024**3
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"  # the Part 10 preamble


class DicomSeriesError(DataError):
    """A DICOM series cannot be read as one volume; the message names the file and the problem."""


class SeveralSeriesError(DicomSeriesError):
    """A folder holds more than one image series; ``series`` lists them (UID, description, slices)."""

    def __init__(self, message: str, series: list[SeriesInfo]):
        super().__init__(message)
        self.series = series


class CTScan(NamedTuple):
    volume: np.ndarray  # (D, H, W) float32, HU, display order
    spacing: tuple[float, float, float]  # mm, (D, H, W)


@dataclass(frozen=True)
class SeriesInfo:
    """What identifies a series without identifying the patient."""

    uid: str
    number: str
    description: str
    slices: int

    def line(self) -> str:
        return f"series={self.uid}  (number {self.number or '-'}, {self.description or 'no description'!r}, {self.slices} slices)"


def is_ct_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is something :func:`load_ct` reads by its form: a folder, a ``.zip``, a NIfTI file."""
    path = Path(path)
    name = path.name.lower()
    return path.is_dir() or name.endswith(ZIP_SUFFIX) or name.endswith(NIFTI_SUFFIXES)


def load_ct(path: str | os.PathLike, series: str | None = None, reorient: bool = True) -> CTScan:
    """The CT at ``path`` (NIfTI file, DICOM series folder or ``.zip``) as HU ``(D, H, W)`` and spacing.

    ``series``: the ``SeriesInstanceUID`` (or ``SeriesNumber``) to read when the folder holds several.
    ``reorient=False`` keeps the file's axes (NIfTI only; a DICOM series always has its geometry applied).
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: not found (expected a NIfTI file, a DICOM series folder or a .zip of one)")
    name = path.name.lower()
    if path.is_dir():
        decoded = _dicom_image(_folder_files(path), path, series)
    elif name.endswith(ZIP_SUFFIX):
        decoded = _dicom_image(_zip_files(path), path, series)
    elif name.endswith(NIFTI_SUFFIXES):
        decoded = _load_nifti(path)
    else:
        raise CorruptFileError(f"{path}: not a CT input; give a .nii / .nii.gz file, a DICOM series folder or a .zip")
    return _to_scan(decoded, path, reorient)


# ----------------------------------------------------------------------------------------------
# NIfTI and the common orientation step
# ----------------------------------------------------------------------------------------------


class _FileVolume(NamedTuple):
    """A decoded volume in its file's axes ``(x, y, z)``, before any reorientation or rescaling:
    reorienting flips and permutes views of ``stored``, and the rescale writes the one copy."""

    stored: np.ndarray  # as the file stores it (int16 for most CT)
    slope: float  # voxel value = stored * slope + intercept
    intercept: float
    affine: np.ndarray  # voxel -> RAS+ mm
    zooms: tuple[float, ...]  # voxel size along the file axes, mm
    finite: bool = False  # known finite (integers, finite rescale): no pass to check for NaN


def _load_nifti(path: Path) -> _FileVolume:
    """The NIfTI at ``path`` decoded once into memory: a truncated file fails here with its name, and
    reorienting it (or reading it both ways, :func:`decode_nifti`) decodes nothing again."""
    from med3dvlm.data.volumes import read_stored_nifti

    try:
        stored, slope, intercept, affine, zooms = read_stored_nifti(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unreadable
        raise CorruptFileError(f"{path}: cannot read NIfTI volume ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(affine, dtype=np.float64)
    return _FileVolume(stored, slope, intercept, affine, zooms, _integers_scaled(stored, slope, intercept))


def _integers_scaled(stored: np.ndarray, slope: float, intercept: float) -> bool:
    """Whether ``stored`` holds integers and the rescale keeps every one finite in float32."""
    if not np.issubdtype(stored.dtype, np.integer):
        return False
    largest = abs(slope) * 2.0 ** (8 * stored.dtype.itemsize) + abs(intercept)
    return bool(np.isfinite(largest) and largest < np.finfo(np.float32).max)


class DecodedNifti(NamedTuple):
    """A NIfTI decoded once (:func:`decode_nifti`): the range of its voxel values, and both ways to
    read it without decoding again."""

    decoded: _FileVolume
    path: Path

    def value_range(self) -> tuple[float, float]:
        """Smallest and largest voxel value (rescaled), from the stored extremes: no float copy."""
        from med3dvlm.data.volumes import rescaled_float32

        stored = self.decoded.stored
        if stored.size == 0:
            raise VolumeShapeError(f"{self.path}: volume has shape {stored.shape}; expected three non-empty axes")
        extremes = np.array([stored.min(), stored.max()], dtype=stored.dtype)
        low, high = sorted(float(v) for v in rescaled_float32(extremes, self.decoded.slope, self.decoded.intercept))
        return low, high

    def as_stored(self) -> np.ndarray:
        """``(D, H, W)`` in the file's own axes: how prepared volumes are read (``load_volume``)."""
        return _to_scan(self.decoded, self.path, reorient=False).volume

    def as_ct(self) -> CTScan:
        """What :func:`load_ct` gives: display orientation and spacing."""
        return _to_scan(self.decoded, self.path, reorient=True)


def decode_nifti(path: str | os.PathLike) -> DecodedNifti:
    """A NIfTI file decoded once, so inference can tell prepared volumes (in [0, 1]) from raw CT by
    its values and then read it either way without decompressing it again."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: volume file not found")
    return DecodedNifti(_load_nifti(path), path)


def _to_scan(decoded: _FileVolume, path: Path, reorient: bool) -> CTScan:
    """``(D, H, W)`` float32 and spacing. Reorienting flips and permutes views of the stored array,
    and the rescale writes them into the result: one pass over the volume (nibabel's
    ``as_reoriented`` then ``get_fdata`` make three)."""
    from nibabel import orientations

    from med3dvlm.data.volumes import rescaled_float32

    data = decoded.stored
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) == 0:
        raise VolumeShapeError(f"{path}: volume has shape {data.shape}; expected three non-empty axes")
    zooms = [round(float(z), 6) for z in decoded.zooms[:3]]
    if reorient:
        current = orientations.io_orientation(decoded.affine)
        transform = orientations.ornt_transform(current, orientations.axcodes2ornt(DISPLAY_AXCODES))
        data = orientations.apply_orientation(data, transform)  # views: flips, then a transpose
        permuted = [0.0, 0.0, 0.0]
        for axis, (target, _) in enumerate(transform):  # file axis `axis` becomes axis `target`
            permuted[int(target)] = zooms[axis]
        zooms = permuted
    # (x, y, z) = (W, H, D) -> (D, H, W)
    ordered = data.transpose(2, 1, 0)
    volume = rescaled_float32(ordered, decoded.slope, decoded.intercept, out=np.empty(ordered.shape, np.float32))
    if not decoded.finite and not np.isfinite(volume).all():
        raise NonFiniteValuesError(f"{path}: volume holds NaN or infinite values")
    return CTScan(volume, (zooms[2], zooms[1], zooms[0]))


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    name: str  # as shown in messages: a path, or "archive.zip:member"
    read: Callable[[], Any]  # -> what pydicom.dcmread accepts (a path or a file-like object)


def _folder_files(folder: Path, exclude: Sequence[Path] = ()) -> Iterator[_File]:
    excluded = [Path(p) for p in exclude]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if any(path == e or e in path.parents for e in excluded):
            continue
        yield _File(str(path), lambda path=path: path)


def _zip_files(path: Path) -> Iterator[_File]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable zip archive ({exc})") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_UNCOMPRESSED_BYTES:
            raise CorruptFileError(
                f"{path}: unpacks to {total / 1024**3:.1f} GiB, above the {MAX_ZIP_UNCOMPRESSED_BYTES / 1024**3:.0f} GiB "
                "limit for one series; unpack it and give the folder"
            )
        for member in members:
            try:
                data = archive.read(member)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CorruptFileError(f"{path}:{member.filename}: cannot unpack ({exc})") from exc
            yield _File(f"{path}:{member.filename}", lambda data=data: io.BytesIO(data))


def _is_dicom(file: _File) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble; that is all we accept."""
    source = file.read()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            head = handle.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    else:
        head = source.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


@dataclass
class _Slice:
    file: _File
    dataset: Any  # pydicom Dataset, header only
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    row_direction: np.ndarray  # first three of ImageOrientationPatient: along a row (increasing column)
    column_direction: np.ndarray  # last three: down a column (increasing row)
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    size: tuple[int, int]  # (rows, columns)


def _read_headers(files: Iterator[_File], where: Path) -> tuple[dict[str, list[tuple[_File, Any]]], list[str]]:
    """DICOM files grouped by SeriesInstanceUID, header only; non-DICOM file names."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[tuple[_File, Any]]] = {}
    skipped: list[str] = []
    for file in files:
        if not _is_dicom(file):
            skipped.append(file.name)
            continue
        try:
            dataset = pydicom.dcmread(file.read(), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
            raise CorruptFileError(f"{file.name}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
        uid = str(dataset.get("SeriesInstanceUID", "") or "")
        if not uid:  # DICOMDIR and other non-image objects
            skipped.append(file.name)
            continue
        groups.setdefault(uid, []).append((file, dataset))
    return groups, skipped


def _is_image_series(members: list[tuple[_File, Any]]) -> bool:
    """A series is an image series when its files have rows and columns (a dose report has none)."""
    return any("Rows" in dataset and "Columns" in dataset for _, dataset in members)


def _series_info(uid: str, members: list[tuple[_File, Any]]) -> SeriesInfo:
    first = members[0][1]
    return SeriesInfo(uid, str(first.get("SeriesNumber", "") or ""), str(first.get("SeriesDescription", "") or ""), len(members))


def list_series(path: str | os.PathLike, exclude: Sequence[Path] = ()) -> list[SeriesInfo]:
    """The image series of a DICOM folder (less the ``exclude`` paths) or ``.zip``: UID, number,
    description, slice count."""
    path = Path(path)
    files = _zip_files(path) if path.name.lower().endswith(ZIP_SUFFIX) else _folder_files(path, exclude)
    groups, _ = _read_headers(files, path)
    return [_series_info(uid, members) for uid, members in groups.items() if _is_image_series(members)]


def _choose_series(groups: dict[str, list[tuple[_File, Any]]], where: Path, series: str | None) -> list[tuple[_File, Any]]:
    images = {uid: members for uid, members in groups.items() if _is_image_series(members)}
    infos = [_series_info(uid, members) for uid, members in images.items()]
    if series is not None:
        chosen = [info for info in infos if series in (info.uid, info.number)]
        if len(chosen) != 1:
            how = "matches no" if not chosen else "matches more than one"
            listing = "\n".join("  " + info.line() for info in infos)
            raise DicomSeriesError(f"{where}: series={series} {how} image series here; the series are:\n{listing}")
        return images[chosen[0].uid]
    if not images:
        raise DicomSeriesError(f"{where}: no DICOM image series found (no file with pixel rows and columns)")
    if len(images) > 1:
        listing = "\n".join("  " + info.line() for info in infos)
        raise SeveralSeriesError(
            f"{where}: holds {len(images)} image series; choose one with series=<SeriesInstanceUID or number>:\n{listing}",
            infos,
        )
    return next(iter(images.values()))


def _slice(file: _File, dataset: Any) -> _Slice:
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomSeriesError(
            f"{file.name}: a multi-frame image ({dataset.NumberOfFrames} frames); only single-frame series are read "
            "(convert it to NIfTI, e.g. with dcm2niix)"
        )
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in dataset]
    if missing:
        raise DicomSeriesError(f"{file.name}: lacks {', '.join(missing)}; its place in the volume is unknown")
    orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
    return _Slice(
        file=file,
        dataset=dataset,
        position=np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64),
        row_direction=orientation[:3],
        column_direction=orientation[3:],
        pixel_spacing=(float(dataset.PixelSpacing[0]), float(dataset.PixelSpacing[1])),
        size=(int(dataset.Rows), int(dataset.Columns)),
    )


def _check_consistent(slices: Sequence[_Slice]) -> None:
    first = slices[0]
    for other in slices[1:]:
        if other.size != first.size:
            raise DicomSeriesError(
                f"{other.file.name}: slice of {other.size[0]} x {other.size[1]} pixels in a series of "
                f"{first.size[0]} x {first.size[1]} ({first.file.name})"
            )
        if not (
            np.allclose(other.row_direction, first.row_direction, atol=ORIENTATION_TOLERANCE)
            and np.allclose(other.column_direction, first.column_direction, atol=ORIENTATION_TOLERANCE)
        ):
            raise DicomSeriesError(f"{other.file.name}: slice orientation differs from {first.file.name}'s")
        if not np.allclose(other.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise DicomSeriesError(f"{other.file.name}: pixel spacing {other.pixel_spacing} differs from {first.pixel_spacing}")


def _ordered_slices(members: list[tuple[_File, Any]], where: Path) -> tuple[list[_Slice], np.ndarray]:
    """Slices sorted along the normal, and the step between them (mm, LPS); checks gaps and tilt."""
    slices = [_slice(file, dataset) for file, dataset in members]
    _check_consistent(slices)
    normal = np.cross(slices[0].row_direction, slices[0].column_direction)
    slices.sort(key=lambda s: float(s.position @ normal))
    if len(slices) == 1:
        thickness = float(slices[0].dataset.get("SliceThickness", 1.0) or 1.0)
        return slices, normal * thickness
    distances = np.array([float(s.position @ normal) for s in slices])
    gaps = np.diff(distances)
    duplicate = int(np.argmin(gaps))
    if gaps[duplicate] <= 1e-3:
        raise DicomSeriesError(
            f"{where}: {slices[duplicate].file.name} and {slices[duplicate + 1].file.name} lie at the same position; "
            "two series mixed under one UID, or a duplicated file"
        )
    spacing = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - spacing) > SPACING_TOLERANCE * spacing)
    if uneven.size:
        k = int(uneven[0])
        what = "a slice is missing" if gaps[k] > spacing else "slices are unevenly spaced"
        raise DicomSeriesError(
            f"{where}: slices are not evenly spaced ({what}): {gaps[k]:.3g} mm between {slices[k].file.name} and "
            f"{slices[k + 1].file.name}, where the series steps {spacing:.3g} mm "
            f"({uneven.size} uneven gap(s)); give a complete series, or resample it (e.g. dcm2niix) to NIfTI"
        )
    step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    cosine = abs(float(step @ normal)) / float(np.linalg.norm(step))
    angle = float(np.degrees(np.arccos(min(1.0, cosine))))
    if angle > TILT_TOLERANCE_DEGREES:
        raise DicomSeriesError(
            f"{where}: gantry tilt of {angle:.1f} degrees (slices are not stacked along their normal); the volume "
            "would be sheared. Resample it (e.g. dcm2niix corrects tilt) and give the NIfTI"
        )
    return slices, step


def _pixels_in_hu(item: _Slice) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, get_decoder

    dataset = pydicom.dcmread(item.file.read())
    if "PixelData" not in dataset:
        raise DicomSeriesError(f"{item.file.name}: holds no pixel data")
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    try:
        decoder = get_decoder(syntax) if syntax is not None else None
    except NotImplementedError:
        decoder = None
    if syntax is not None and (decoder is None or not decoder.is_available):
        name = getattr(syntax, "name", str(syntax))
        needs = "; ".join(decoder.missing_dependencies) if decoder is not None else "no decoder exists in pydicom"
        raise DicomSeriesError(
            f"{item.file.name}: pixel data compressed as {name} ({syntax}), which no installed decoder reads "
            f"({needs}); install one of those packages or decompress the series (e.g. gdcmconv --raw)"
        )
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure: the file's pixels are unreadable
        raise DicomSeriesError(f"{item.file.name}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if stored.shape != item.size:
        raise DicomSeriesError(f"{item.file.name}: pixel data of shape {stored.shape}, expected {item.size} (one grey frame)")
    return np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)


def _dicom_image(files: Iterator[_File], where: Path, series: str | None) -> _FileVolume:
    """One series of ``files`` as NIfTI would hold it: file axes (column, row, slice), RAS affine."""
    groups, skipped = _read_headers(files, where)
    if skipped and groups:
        log.info("%s: %d file(s) that are not DICOM images were ignored (e.g. %s)", where, len(skipped), Path(skipped[0]).name)
    if not groups:
        raise DicomSeriesError(f"{where}: no DICOM file found (DICOM files start with the 'DICM' preamble)")
    slices, step = _ordered_slices(_choose_series(groups, where, series), where)
    volume = np.stack([_pixels_in_hu(item) for item in slices])  # (k, rows, columns)
    row_spacing, column_spacing = slices[0].pixel_spacing
    # voxel (column i, row j, slice k) -> LPS: position_0 + i*dc*row_direction + j*dr*column_direction + k*step
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = slices[0].row_direction * column_spacing
    affine_lps[:3, 1] = slices[0].column_direction * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = slices[0].position
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    zooms = (column_spacing, row_spacing, float(np.linalg.norm(step)))
    return _FileVolume(volume.transpose(2, 1, 0), 1.0, 0.0, affine_ras, zooms)
