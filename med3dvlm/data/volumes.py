"""Read and write 3D volumes as ``float32`` arrays of shape ``(1, D, H, W)``.

Axis order (SPEC §6): the released Med3DVLM code reads NIfTI files with SimpleITK, whose arrays are
``(D, H, W)`` (slowest axis first), while the file stores ``(x, y, z) = (W, H, D)``. nibabel returns
the file's ``(x, y, z)`` order, so this reader transposes to ``(D, H, W)`` to see exactly what the
released model saw. No reorientation by the affine is done, for the same reason. M3D's own ``.npy``
release already holds ``(1, D, H, W)``.

Fast format: an uncompressed ``.nii`` next to the ``.nii.gz`` a dataset lists (``volume_format``
``nii`` in the data config, see ``with_volume_format``). The preparation writes it as ``uint8`` with
the NIfTI scale factor ``scl_slope = 1/255`` (or ``int16`` with ``1/32767``), so the file says itself
how to turn its integers into [0, 1]; the reader memory-maps it and scales in one pass, with no
decompression. Any NIfTI viewer opens it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

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
from med3dvlm.utils import atomic_path

_NUMPY_SUFFIX = ".npy"
_UNCOMPRESSED_NIFTI_SUFFIX = ".nii"

# Data config ``volume_format`` values: which sibling of a listed volume the readers open.
VOLUME_FORMATS = ("nii.gz", "nii", "npy")
FAST_VOLUME_FORMAT = "nii"  # uncompressed, memory-mapped NIfTI (module docstring)
# How ``save_volume`` stores voxels. Integer encodings hold [0, 1] in ``levels`` steps via scl_slope.
VOLUME_ENCODINGS = ("float32", "uint8", "int16")
ENCODING_LEVELS = {"uint8": 255, "int16": 32767}  # largest value of each integer type = intensity 1.0
# Values this far outside [0, 1] (float rounding after a resize) are clipped before integer encoding.
ENCODING_RANGE_TOLERANCE = 1e-5


def volume_suffix(path: str | os.PathLike) -> str:
    """The recognised suffix of ``path`` (``.nii.gz``, ``.nii`` or ``.npy``), else an error."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise UnknownFormatError(
        f"{path}: unknown volume format; expected a file ending in {', '.join(VOLUME_SUFFIXES)}"
    )


def with_volume_format(path: str | os.PathLike, volume_format: str | None) -> Path:
    """``path`` with its volume suffix replaced by ``volume_format`` (``nii.gz``, ``nii`` or ``npy``).

    ``None`` keeps the path as listed. This is how a dataset that lists ``x.nii.gz`` is read from
    its fast sibling ``x.nii`` when the data config says ``volume_format: nii``.
    """
    path = Path(path)
    if volume_format is None:
        return path
    target = "." + str(volume_format).lstrip(".")
    if target[1:] not in VOLUME_FORMATS:
        raise ValueError(f"volume_format must be one of {VOLUME_FORMATS} or None, got {volume_format!r}")
    suffix = volume_suffix(path)
    return path.with_name(path.name[: -len(suffix)] + target)


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
    elif suffix == _UNCOMPRESSED_NIFTI_SUFFIX:
        volume = _read_nifti(path, _scaled_from_memory_map)
    else:
        volume = _read_nifti(path, _decoded_in_memory)
    _check_finite(volume, path)
    return np.ascontiguousarray(volume)


def _decoded_in_memory(path: Path) -> np.ndarray:
    stored = read_stored_nifti(path)
    return rescaled_float32(stored.stored, stored.slope, stored.intercept)


# sizeof_hdr, the first field of a NIfTI header, tells NIfTI-1 (348) from NIfTI-2 (540)
_NIFTI_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


# DEFLATE expands data at most ~1032-fold; a trailer stating more is damage, not a size to allocate.
_MAX_DEFLATE_RATIO = 1032


def _gunzip(data: bytes) -> bytes | bytearray:
    """Every member of a gzip stream.

    Reading a ``.nii.gz`` costs mostly this, and batch inference on a CPU is bound by it. The usual
    file is one member whose trailer states its size, and libdeflate (pip ``deflate``) inflates it
    in one call into a buffer of that size: ~2.2 ms for a 2 MB CT here, against ~3.0 with ISA-L
    and ~5.5 with zlib. libdeflate reads only the first member, so its output counts only when it
    is what the file's last trailer describes (size and CRC-32; 0.04 ms): then the first member was
    the last. Anything else (several members, over 4 GiB, a damaged file) takes the standard
    library's path, which reads every member and says what is wrong.
    """
    try:
        import deflate
    except ImportError:  # the declared dependency missing: zlib still reads every file
        deflate = None
    stated_crc, stated_size = int.from_bytes(data[-8:-4], "little"), int.from_bytes(data[-4:], "little")
    if deflate is not None and len(data) >= 18 and stated_size <= _MAX_DEFLATE_RATIO * len(data):
        try:
            inflated = deflate.gzip_decompress(data)
        except deflate.DeflateError:
            inflated = None
        if inflated is not None and len(inflated) == stated_size and deflate.crc32(inflated) == stated_crc:
            return inflated
    import gzip

    return gzip.decompress(data)


class StoredNifti(NamedTuple):
    """A NIfTI as stored: the voxel array in the file's axes, the slope and intercept that turn it
    into voxel values (nibabel's effective ``scl_*``), the affine and the voxel sizes."""

    stored: np.ndarray
    slope: float
    intercept: float
    affine: np.ndarray
    zooms: tuple[float, ...]


def read_stored_nifti(path: str | os.PathLike) -> StoredNifti:
    """The NIfTI at ``path`` read into memory; a ``.nii.gz`` is decompressed in one piece (faster than
    nibabel's streaming read) and its voxels are a view of the decompressed bytes.

    nibabel's ``from_bytes`` would copy the voxels twice (into a ``BytesIO``, then into the array),
    holding two copies at a time: 300 MB more for a 512 x 512 x 600 int16 CT, and page faults on
    fresh memory for each scan. nibabel still parses the header and extensions, from the bytes
    before the voxels, and says where they start, how they are stored and scaled. Other files, and
    headers nibabel must identify itself, are read by ``nibabel.load``. Decoder errors propagate:
    callers name the file."""
    path = Path(path)
    if not path.name.lower().endswith(".gz"):
        return _stored_from_image(nib.load(path, mmap=False))
    data = _gunzip(path.read_bytes())
    first_field = data[:4]  # sizeof_hdr, in the file's byte order
    image_class = _NIFTI_HEADER_SIZES.get(int.from_bytes(first_field, "little")) or _NIFTI_HEADER_SIZES.get(
        int.from_bytes(first_field, "big")
    )
    if image_class is None:
        return _stored_from_image(nib.load(path, mmap=False))  # not NIfTI-1/2: nibabel says what it is, or why not
    header_size = image_class.header_class.template_dtype.itemsize
    probe = image_class.header_class(bytes(data[:header_size]), check=False)
    # The header, the 4-byte extension flag and any extensions end where the voxels start.
    prefix = bytes(data[: max(int(probe.get_data_offset()), header_size + 4)])
    image = image_class.from_bytes(prefix)  # nibabel's own parse and checks; its proxy is never read
    proxy = image.dataobj
    count = int(np.prod(proxy.shape, dtype=np.int64))
    needed = proxy.offset + count * proxy.dtype.itemsize
    if needed > len(data):
        raise ValueError(f"expected {needed} bytes of header and voxels, the file holds {len(data)}")
    stored = np.ndarray(proxy.shape, proxy.dtype, buffer=data, offset=proxy.offset, order=proxy.order)
    return StoredNifti(stored, float(proxy.slope), float(proxy.inter), image.affine, tuple(image.header.get_zooms()))


def _stored_from_image(image) -> StoredNifti:
    stored, slope, intercept = stored_values(image)
    return StoredNifti(stored, slope, intercept, image.affine, tuple(image.header.get_zooms()))


def stored_values(image) -> tuple[np.ndarray, float, float]:
    """The array a NIfTI image stores (in the file's order, not copied where nibabel need not) and
    the slope and intercept that turn it into voxel values (nibabel's effective ``scl_*``)."""
    proxy = image.dataobj
    if isinstance(proxy, np.ndarray):  # an image built in memory
        return proxy, 1.0, 0.0
    return np.asarray(proxy.get_unscaled()), float(proxy.slope), float(proxy.inter)


def rescaled_float32(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``stored * slope + intercept`` in one pass, into ``out`` when given (any view of
    ``stored``, e.g. flipped and transposed, lands in a contiguous array that way), else in the
    stored order.

    nibabel's ``get_fdata`` would scale in float64 and then cast, several times slower; the result
    is the same up to float32 rounding.
    """
    if out is None:
        out = np.empty(stored.shape, np.float32, order="F" if stored.flags.f_contiguous else "C")
    if slope == 1.0 and intercept == 0.0:
        np.copyto(out, stored, casting="unsafe")
        return out
    np.multiply(stored, np.float32(slope), out=out, dtype=np.float32)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def scaled_float32(image) -> np.ndarray:
    """float32 voxel values of a NIfTI image in the file's order (a memory map's are copied: the
    map must not escape)."""
    return rescaled_float32(*stored_values(image))


def _scaled_from_memory_map(path: Path) -> np.ndarray:
    return scaled_float32(nib.load(path, mmap=True))


def _read_nifti(path: Path, decode) -> np.ndarray:
    try:
        data = decode(path)
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


def save_volume(volume: np.ndarray, path: str | os.PathLike, encoding: str = "float32") -> Path:
    """Write a ``(D, H, W)`` or ``(1, D, H, W)`` volume so that ``load_volume`` reads it back.

    NIfTI files are written in the released layout (file axes ``(x, y, z) = (W, H, D)``, identity
    affine). The write is atomic (``med3dvlm.utils.atomic_path``: a temporary file, then renamed) so an
    interrupted run never leaves a truncated volume behind. Parent folders are created.

    ``encoding`` (NIfTI only): ``float32`` stores the values as they are; ``uint8`` / ``int16``
    store ``round(value * levels)`` with ``scl_slope = 1 / levels`` (``ENCODING_LEVELS``), for
    volumes in [0, 1]: the fast format's 4x / 2x smaller voxels, exact to half a step.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if encoding not in VOLUME_ENCODINGS:
        raise ValueError(f"encoding must be one of {VOLUME_ENCODINGS}, got {encoding!r}")
    if encoding != "float32" and suffix == _NUMPY_SUFFIX:
        raise ValueError(f"{path}: .npy volumes are stored as float32 (M3D's layout); {encoding} needs NIfTI")
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise VolumeShapeError(
            f"{path}: cannot save array of shape {data.shape}; expected (D, H, W) or (1, D, H, W)"
        )
    with atomic_path(path, suffix=suffix) as temporary:  # the suffix tells nibabel the format
        if suffix == _NUMPY_SUFFIX:
            np.save(temporary, data[np.newaxis])  # M3D's .npy layout: (1, D, H, W)
        else:
            nib.save(_nifti_image(data, encoding, path), temporary)
    return path


def _nifti_image(data: np.ndarray, encoding: str, path: Path) -> nib.Nifti1Image:
    """The ``(D, H, W)`` array as a NIfTI image with file axes ``(W, H, D)`` in ``encoding``."""
    file_order = data.transpose(2, 1, 0)
    if encoding == "float32":
        return nib.Nifti1Image(np.ascontiguousarray(file_order), affine=np.eye(4))
    levels = ENCODING_LEVELS[encoding]
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    in_range = -ENCODING_RANGE_TOLERANCE <= low and high <= 1 + ENCODING_RANGE_TOLERANCE
    if not in_range:  # also catches NaN, which fails every comparison
        raise ValueError(
            f"{path}: {encoding} encoding holds intensities in [0, 1], but the volume spans [{low}, {high}]; "
            "use encoding float32 for other values"
        )
    steps = np.rint(np.clip(file_order, 0.0, 1.0).astype(np.float64) * levels)  # float64: the nearest step
    image = nib.Nifti1Image(np.ascontiguousarray(steps.astype(encoding)), affine=np.eye(4))
    image.header.set_slope_inter(1.0 / levels, 0.0)
    return image
