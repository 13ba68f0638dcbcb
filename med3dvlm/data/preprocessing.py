"""Raw CT -> model input: the one definition used by ``prepare`` and by every inference path.

A raw volume (``(D, H, W)`` float32 in display orientation, e.g. from :func:`med3dvlm.data.ct.load_ct`)
becomes a model input in three steps (SPEC §6 for M3D; the HU window is ours for CT in HU):

1. intensity: clip to the HU window and map it onto [0, 1], or (``hu_window=None``) scale by min and
   max, as M3D's slices were;
2. crop to the foreground (the box of voxels > 0 after step 1), when ``crop_foreground``;
3. resize trilinearly to ``shape`` (the prepared size, 128 x 256 x 256 in SPEC §6).

The model then resizes to its own input size, as it does for prepared volumes. Orientation is the
reader's job (``load_ct`` reorients to display order); ``reorient`` here records whether it did.

Every export records the :class:`Preprocessing` of its training data (``preprocessing.json``), and
``med3dvlm.load_model`` applies exactly that to raw input, so the model sees the same tensor as in
training. A data root records its own (``<root>/preprocessing.json``), written by ``prepare`` and by
the phantom generator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from med3dvlm.data.errors import CorruptFileError, DataError

PREPARED_SHAPE = (128, 256, 256)  # SPEC §6: every prepared volume is 1 x 128 x 256 x 256 (D, H, W)
# Our default for HU input (not from the paper): the soft-tissue window, level 40 / width 400 HU,
# in which most abdominal CT of M3D (Radiopaedia images) is displayed.
DEFAULT_HU_WINDOW = (-160.0, 240.0)
# The file every data root and every export carries (one JSON object, ``Preprocessing.to_dict``).
PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_VERSION = 1


class PreprocessingError(DataError):
    """A volume cannot be brought to model input (e.g. a constant volume, nothing to crop to)."""


@dataclass(frozen=True)
class Preprocessing:
    """How raw volumes became the training data; applied the same way at inference."""

    hu_window: tuple[float, float] | None = DEFAULT_HU_WINDOW  # None: min-max scaling
    crop_foreground: bool = True
    shape: tuple[int, int, int] = PREPARED_SHAPE
    reorient: bool = True  # raw NIfTI/DICOM read in display orientation (load_ct's reorient)

    def __post_init__(self) -> None:
        window = None if self.hu_window is None else tuple(float(v) for v in self.hu_window)
        if window is not None and (len(window) != 2 or not window[0] < window[1]):
            raise ValueError(f"hu_window must be [lower, upper] HU with lower < upper, or null; got {self.hu_window}")
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be three positive sizes (D, H, W), got {self.shape}")
        object.__setattr__(self, "hu_window", window)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "crop_foreground", bool(self.crop_foreground))
        object.__setattr__(self, "reorient", bool(self.reorient))

    # -- applying ---------------------------------------------------------------------------------
    def scale(self, volume: np.ndarray, where: object = "volume") -> np.ndarray:
        """Step 1: intensities onto [0, 1] (window or min-max)."""
        if self.hu_window is None:
            return scale_min_max(volume, where)
        return scale_hu_window(volume, self.hu_window)

    def apply(self, volume: np.ndarray, where: object = "volume") -> np.ndarray:
        """``(D, H, W)`` raw volume -> ``(D, H, W)`` float32 in [0, 1] at ``shape``."""
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim == 4 and volume.shape[0] == 1:
            volume = volume[0]
        if volume.ndim != 3 or min(volume.shape) == 0:
            raise PreprocessingError(f"{where}: expected a (D, H, W) volume, got shape {volume.shape}")
        scaled = self.scale(volume, where)
        if self.crop_foreground:
            scaled = crop_foreground(scaled, where)
        return resize(scaled, self.shape)

    # -- recording --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["hu_window"] = None if self.hu_window is None else list(self.hu_window)
        record["shape"] = list(self.shape)
        return {"version": PREPROCESSING_VERSION, **record}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: object = "preprocessing record") -> Preprocessing:
        fields = {"hu_window", "crop_foreground", "shape", "reorient"}
        unknown = set(record) - fields - {"version"}
        if unknown:
            raise ValueError(f"{where}: unknown preprocessing fields {sorted(unknown)}; known: {sorted(fields)}")
        if record.get("version", PREPROCESSING_VERSION) > PREPROCESSING_VERSION:
            raise ValueError(f"{where}: preprocessing version {record['version']} is newer than this med3dvlm")
        missing = {"hu_window", "shape"} - set(record)
        if missing:
            raise ValueError(f"{where}: preprocessing record lacks {sorted(missing)}")
        return cls(**{key: record[key] for key in fields if key in record})

    def describe(self) -> str:
        intensity = "min-max scaled" if self.hu_window is None else "HU window [{:g}, {:g}]".format(*self.hu_window)
        crop = ", cropped to the foreground" if self.crop_foreground else ""
        return f"{intensity}{crop}, resized to {' x '.join(map(str, self.shape))}"


def write_preprocessing(folder: str | os.PathLike, preprocessing: Preprocessing) -> Path:
    """``<folder>/preprocessing.json``, written atomically."""
    from med3dvlm.utils import json_bytes, write_atomic

    path = Path(folder) / PREPROCESSING_FILE
    return write_atomic(path, json_bytes(preprocessing.to_dict(), indent=2, ensure_ascii=True))


def read_preprocessing(folder: str | os.PathLike) -> Preprocessing | None:
    """The record of a data root or export folder; ``None`` when it has none."""
    path = Path(folder) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return Preprocessing.from_dict(record, where=path)
    except (ValueError, TypeError) as error:
        raise CorruptFileError(f"{path}: unreadable preprocessing record ({error})") from error


def as_preprocessing(value: Preprocessing | Mapping[str, Any] | None) -> Preprocessing | None:
    """A :class:`Preprocessing` from itself, its ``to_dict`` record or ``None``."""
    if value is None or isinstance(value, Preprocessing):
        return value
    return Preprocessing.from_dict(dict(value))


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------


def scale_min_max(volume: np.ndarray, where: object = "volume") -> np.ndarray:
    """Map the volume's minimum to 0 and maximum to 1 (SPEC §6)."""
    low, high = float(volume.min()), float(volume.max())
    if not high > low:
        raise PreprocessingError(f"{where}: every voxel holds the same value {low}; there is no image to scale")
    return (volume - np.float32(low)) / np.float32(high - low)


def scale_hu_window(volume: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Clip to the window ``(lower, upper)`` in HU and map it linearly onto [0, 1]."""
    lower, upper = (float(v) for v in window)
    scaled = np.clip(volume, lower, upper).astype(np.float32, copy=False)  # a new array: safe in place
    scaled -= np.float32(lower)
    scaled /= np.float32(upper - lower)
    return scaled


def crop_foreground(volume: np.ndarray, where: object = "volume") -> np.ndarray:
    """``(D, H, W)`` cropped to the box of voxels > 0 (SPEC §6): MONAI's bounding box, as its
    ``CropForeground(margin=0)`` finds it, taken as a view (the transform itself copies through a
    MetaTensor, ~3x the time)."""
    from monai.transforms.utils import generate_spatial_bounding_box

    if not (volume > 0).any():
        raise PreprocessingError(f"{where}: no voxel above the lowest intensity; nothing to crop to")
    start, end = generate_spatial_bounding_box(volume[np.newaxis], margin=0)
    return volume[tuple(slice(int(a), int(b)) for a, b in zip(start, end))]


def resize(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(D, H, W)`` resized trilinearly to ``shape``, clipped to [0, 1].

    ``torch.nn.functional.interpolate`` with ``align_corners=False``: the call MONAI's
    ``Resize(mode="trilinear")`` makes, without its MetaTensor bookkeeping (equal outputs,
    ``tests/test_prepare.py``)."""
    import torch

    if tuple(volume.shape) == tuple(shape):
        resized = np.array(volume, dtype=np.float32)
    else:
        source = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        resized = torch.nn.functional.interpolate(
            source, size=tuple(int(n) for n in shape), mode="trilinear", align_corners=False
        )[0, 0].numpy()
    # Trilinear weights are convex, so only float rounding can leave [0, 1].
    return np.clip(resized, 0.0, 1.0, out=resized)


def crop_and_resize(volume: np.ndarray, shape: Sequence[int], where: object = "volume") -> np.ndarray:
    """Crop ``(D, H, W)`` to the box of voxels > 0, resize trilinearly to ``shape`` (SPEC §6)."""
    return resize(crop_foreground(volume, where), shape)
