"""Read and write 3D volumes as ``float32`` arrays of shape ``(1, D, H, W)``.

Axis order (SPEC §6): the released Med3DVLM code reads NIfTI files with SimpleITK, whose arrays are
``(D, H, W)`` (slowest axis first), while the file stores ``(x, y, z) = (W, H, D)``. nibabel returns
the file's ``(x, y, z)`` order, so this reader transposes to ``(D, H, W)`` to see exactly what the
released model saw. No reorientation by the affine is done, for the same reason. M3D's own ``.npy``
release already holds ``(1, D, H, W)``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import nibabel as nib
import numpy as np

from med3dvlm.data.errors import (
    CorruptFileError,
    MissingFileError,
    NonFiniteValuesError,
    UnknownFormatError,
    VolumeShapeError,
)
from med3dvlm.data.layout import VOLUME_SUFFIXES

_NUMPY_SUFFIX = ".npy"


def volume_suffix(path: str | os.PathLike) -> str:
    """The recognised suffix of ``path`` (``.nii.gz``, ``.nii`` or ``.npy``), else an error."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise UnknownFormatError(
        f"{path}: unknown volume format; expected a file ending in {', '.join(VOLUME_SUFFIXES)}"
    )


def load_volume(path: str | os.PathLike) -> np.ndarray:
    """Load a volume as a contiguous ``float32`` array ``(1, D, H, W)`` with only finite values.

    Raises a ``DataError`` subclass naming the file when it is missing, cannot be decoded, has the
    wrong number of dimensions, or holds NaN/Inf.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: volume file not found")
    if suffix == _NUMPY_SUFFIX:
        volume = _read_numpy(path)
    else:
        volume = _read_nifti(path)
    _check_finite(volume, path)
    return np.ascontiguousarray(volume)


def _read_nifti(path: Path) -> np.ndarray:
    try:
        image = nib.load(path, mmap=False)
        data = image.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unreadable
        raise CorruptFileError(
            f"{path}: cannot read NIfTI volume ({type(exc).__name__}: {exc}); "
            "the file is truncated or not a NIfTI file"
        ) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeShapeError(
            f"{path}: NIfTI volume has shape {data.shape}; expected 3 axes (x, y, z), "
            "or 4 with a trailing axis of size 1"
        )
    _check_not_empty(data.shape, path)
    # (x, y, z) = (W, H, D) -> (D, H, W), SPEC §6.
    return data.transpose(2, 1, 0)[np.newaxis]


def _read_numpy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unreadable
        raise CorruptFileError(
            f"{path}: cannot read .npy volume ({type(exc).__name__}: {exc}); "
            "the file is truncated or not a NumPy array file"
        ) from exc
    if not isinstance(data, np.ndarray) or not (
        np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_
    ):
        raise CorruptFileError(f"{path}: .npy file holds {getattr(data, 'dtype', type(data))}, not numbers")
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise VolumeShapeError(
            f"{path}: .npy volume has shape {data.shape}; expected (D, H, W) or (1, D, H, W)"
        )
    _check_not_empty(data.shape, path)
    return data.astype(np.float32)[np.newaxis]


def _check_not_empty(shape: tuple[int, ...], path: Path) -> None:
    if min(shape) == 0:
        raise VolumeShapeError(f"{path}: volume has an empty axis, shape {shape}")


def _check_finite(volume: np.ndarray, path: Path) -> None:
    finite = np.isfinite(volume)
    if finite.all():
        return
    n_nan = int(np.isnan(volume).sum())
    n_inf = int(volume.size - finite.sum()) - n_nan
    raise NonFiniteValuesError(
        f"{path}: volume holds {n_nan} NaN and {n_inf} infinite values (after conversion to float32)"
    )


def save_volume(volume: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a ``(D, H, W)`` or ``(1, D, H, W)`` volume so that ``load_volume`` reads it back.

    NIfTI files are written in the released layout (file axes ``(x, y, z) = (W, H, D)``, identity
    affine). The write is atomic (temporary file in the same folder, then ``os.replace``) so an
    interrupted run never leaves a truncated volume behind. Parent folders are created.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise VolumeShapeError(
            f"{path}: cannot save array of shape {data.shape}; expected (D, H, W) or (1, D, H, W)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary_file(path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        if suffix == _NUMPY_SUFFIX:
            np.save(temporary, data[np.newaxis])  # M3D's .npy layout: (1, D, H, W)
        else:
            image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine=np.eye(4))
            nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _create_temporary_file(folder: Path, prefix: str, suffix: str) -> Path:
    """An empty new file in ``folder`` with the usual umask-based permissions.

    ``tempfile.mkstemp`` would create it readable by the owner only, which then sticks to the
    final volume after ``os.replace`` and breaks datasets shared between users.
    """
    while True:
        candidate = folder / f"{prefix}{secrets.token_hex(6)}.tmp{suffix}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
