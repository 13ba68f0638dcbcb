"""MONAI dictionary transforms for volumes under key ``"image"``, arrays ``(1, D, H, W)``.

Training augmentation follows SPEC §6 exactly; evaluation only converts the type. Both return a
plain ``float32`` ``torch.Tensor`` (no MetaTensor), which collates like any tensor.

Note: the 90-degree rotation swaps H and W, so batches keep one shape only when H == W (true for
prepared M3D volumes, 256 x 256; pass a square ``spatial_size`` otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)

IMAGE_KEY = "image"

# SPEC §6 augmentation (training only).
ROTATE90_PROB = 0.5  # SPEC §6: rotate 90 degrees in the H-W plane with p 0.5
ROTATE90_MAX_K = 3  # MONAI's default, as the released code: k in {1, 2, 3} quarter turns
ROTATE90_SPATIAL_AXES = (1, 2)  # (H, W) among the spatial axes (D, H, W) of a (1, D, H, W) array
FLIP_PROB = 0.1  # SPEC §6: flip each of the three axes with p 0.1
FLIP_SPATIAL_AXES = (0, 1, 2)  # D, H, W; one independent flip per axis
SCALE_INTENSITY_FACTOR = 0.1  # SPEC §6: scale intensity by up to +-10% ...
SCALE_INTENSITY_PROB = 0.5  # ... with p 0.5
SHIFT_INTENSITY_OFFSET = 0.1  # SPEC §6: shift intensity by up to +-0.1 ...
SHIFT_INTENSITY_PROB = 0.5  # ... with p 0.5


def train_transforms(
    spatial_size: Sequence[int] | None = None,
    *,
    rotate_prob: float = ROTATE90_PROB,
    flip_prob: float = FLIP_PROB,
    scale_prob: float = SCALE_INTENSITY_PROB,
    shift_prob: float = SHIFT_INTENSITY_PROB,
    seed: int | None = None,
) -> Compose:
    """SPEC §6 augmentation, optionally after a trilinear resize to ``spatial_size`` (D, H, W).

    The probabilities are arguments only so tests and ablations can force or disable a step; the
    defaults are the paper's. ``seed`` fixes the random state (workers reseed, see datamodules).
    """
    steps: list[MapTransform] = _resize(spatial_size)
    steps.append(
        RandRotate90d(keys=IMAGE_KEY, prob=rotate_prob, max_k=ROTATE90_MAX_K, spatial_axes=ROTATE90_SPATIAL_AXES)
    )
    steps.extend(RandFlipd(keys=IMAGE_KEY, prob=flip_prob, spatial_axis=axis) for axis in FLIP_SPATIAL_AXES)
    steps.append(RandScaleIntensityd(keys=IMAGE_KEY, factors=SCALE_INTENSITY_FACTOR, prob=scale_prob))
    steps.append(RandShiftIntensityd(keys=IMAGE_KEY, offsets=SHIFT_INTENSITY_OFFSET, prob=shift_prob))
    steps.append(_to_float_tensor())
    compose = Compose(steps)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


def eval_transforms(spatial_size: Sequence[int] | None = None) -> Compose:
    """No augmentation: optional trilinear resize, then conversion to a ``float32`` tensor."""
    return Compose([*_resize(spatial_size), _to_float_tensor()])


def _resize(spatial_size: Sequence[int] | None) -> list[MapTransform]:
    if spatial_size is None:
        return []
    size = tuple(int(edge) for edge in spatial_size)
    if len(size) != 3:
        raise ValueError(f"spatial_size must be (D, H, W), got {tuple(spatial_size)}")
    return [Resized(keys=IMAGE_KEY, spatial_size=size, mode="trilinear")]


def _to_float_tensor() -> EnsureTyped:
    return EnsureTyped(keys=IMAGE_KEY, data_type="tensor", dtype=torch.float32, track_meta=False)
