"""Rendering a phantom case as a ``(D, H, W)`` float32 volume in [0, 1], oriented by its plane."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from med3dvlm.data.phantoms.anatomy import (
    ANATOMY,
    AORTA,
    BODY_SEMI_XY,
    FAT_RIM,
    MASS_LOBULATION,
    PLANE_AXES,
    SPINE,
    Lesion,
    PhantomCase,
)

# Intensities in [0, 1] before noise.
_AIR, _LUNG, _FAT, _SOFT, _BONE, _URINE = 0.0, 0.06, 0.22, 0.38, 0.90, 0.24
_ENHANCEMENT = {  # phase -> structure -> intensity
    "non_contrast": {"liver": 0.48, "spleen": 0.46, "cortex": 0.44, "medulla": 0.44, "aorta": 0.42},
    "arterial": {"liver": 0.52, "spleen": 0.58, "cortex": 0.66, "medulla": 0.48, "aorta": 0.95},
    "portal_venous": {"liver": 0.62, "spleen": 0.60, "cortex": 0.62, "medulla": 0.58, "aorta": 0.72},
}
_CYST, _MASS, _MASS_TEXTURE, _CALCIFICATION = 0.20, 0.82, 0.06, 1.0
_NOISE_STD = 0.02


class _Grid:
    """Voxel-centre atlas coordinates of a (D, H, W) grid in a given plane.

    Each atlas axis lies along exactly one array axis, so coordinates are 1-D vectors broadcast on
    demand and every shape is painted only inside its bounding box.
    """

    def __init__(self, shape: tuple[int, int, int], plane: str) -> None:
        self.shape = shape
        self.axis = {name: i for i, name in enumerate(PLANE_AXES[plane])}
        self.lin = {name: (np.arange(shape[i]) * 2.0 + 1.0) / shape[i] - 1.0 for name, i in self.axis.items()}

    def voxel(self, name: str) -> float:
        """Voxel size along atlas axis ``name``, in atlas units."""
        return 2.0 / self.shape[self.axis[name]]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, ...] | None:
        slices: list[slice] = [slice(None)] * 3
        for name, a, b in zip("xyz", lo, hi):
            coords = self.lin[name]
            start, stop = np.searchsorted(coords, a, "left"), np.searchsorted(coords, b, "right")
            if start >= stop:
                return None
            slices[self.axis[name]] = slice(int(start), int(stop))
        return tuple(slices)

    def coords(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = []
        for name in "xyz":
            axis = self.axis[name]
            shape = [1, 1, 1]
            values = self.lin[name][box[axis]].astype(np.float32)
            shape[axis] = values.size
            out.append(values.reshape(shape))
        return out[0], out[1], out[2]


@lru_cache(maxsize=16)
def _grid(shape: tuple[int, int, int], plane: str) -> _Grid:
    return _Grid(shape, plane)


Painter = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _paint(
    volume: np.ndarray,
    grid: _Grid,
    center: Sequence[float],
    semi: Sequence[float],
    value: float | Painter,
    z_range: tuple[float, float] | None = None,
    radial: Painter | None = None,
) -> None:
    """Set ``value`` inside an ellipsoid (semi z = inf: a cylinder limited to ``z_range``).

    ``radial(x, y, z)`` (at most ``1 + MASS_LOBULATION``) optionally scales the boundary for
    lobulated margins; ``value`` may be a function of the coordinates (textures).
    """
    margin = 1.0 + MASS_LOBULATION if radial is not None else 1.0
    lo = [c - margin * s for c, s in zip(center, semi)]
    hi = [c + margin * s for c, s in zip(center, semi)]
    if z_range is not None:
        lo[2], hi[2] = max(lo[2], z_range[0]), min(hi[2], z_range[1])
    box = grid.box(lo, hi)
    if box is None:
        return
    x, y, z = grid.coords(box)
    q = ((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2
    if math.isfinite(semi[2]):
        q = q + ((z - center[2]) / semi[2]) ** 2
    q = np.broadcast_to(q, volume[box].shape)
    inside = q <= (1.0 if radial is None else radial(x, y, z) ** 2)
    target = volume[box]
    if callable(value):
        target[inside] = np.broadcast_to(value(x, y, z), target.shape)[inside]
    else:
        target[inside] = value


def render_volume(case: PhantomCase, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """The (D, H, W) float32 volume of ``case`` in [0, 1], oriented by ``case.plane``."""
    grid = _grid(tuple(shape), case.plane)
    enhancement = _ENHANCEMENT[case.phase]
    volume = np.full(shape, _AIR, dtype=np.float32)
    inf = math.inf
    bx, by = BODY_SEMI_XY
    _paint(volume, grid, (0, 0, 0), (bx, by, inf), _FAT)
    _paint(volume, grid, (0, 0, 0), (bx * FAT_RIM, by * FAT_RIM, inf), _SOFT)
    for lung in ("right_lung", "left_lung"):
        _paint(volume, grid, ANATOMY[lung].center, ANATOMY[lung].semi, _LUNG)
    (sx, sy), sr = SPINE
    _paint(volume, grid, (sx, sy, 0), (sr, sr, inf), _BONE)
    _paint(volume, grid, ANATOMY["liver"].center, ANATOMY["liver"].semi, enhancement["liver"])
    _paint(volume, grid, ANATOMY["spleen"].center, ANATOMY["spleen"].semi, enhancement["spleen"])
    for kidney in ("right_kidney", "left_kidney"):
        organ = ANATOMY[kidney]
        _paint(volume, grid, organ.center, organ.semi, enhancement["cortex"])
        _paint(volume, grid, organ.center, tuple(0.55 * s for s in organ.semi), enhancement["medulla"])
    _paint(volume, grid, ANATOMY["bladder"].center, ANATOMY["bladder"].semi, _URINE)
    (ax, ay), ar, az = AORTA
    _paint(volume, grid, (ax, ay, 0), (ar, ar, inf), enhancement["aorta"], z_range=az)
    for lesion in case.lesions:
        _paint_lesion(volume, grid, case, lesion)
    rng = np.random.default_rng([seed, 3, case.index])
    volume += _NOISE_STD * rng.standard_normal(volume.shape, dtype=np.float32)
    np.clip(volume, 0.0, 1.0, out=volume)
    np.rint(volume * 255.0, out=volume)  # 8-bit levels, as slices exported to PNG/JPEG are
    volume /= 255.0
    return volume


def _paint_lesion(volume: np.ndarray, grid: _Grid, case: PhantomCase, lesion: Lesion) -> None:
    c, r = lesion.center, lesion.radius
    # At the coarsest grids a small lesion could fall between voxel centres; a semi-axis of at
    # least 0.9 voxel guarantees it covers one, so every lesion the text names is in the image.
    semi = tuple(max(r, 0.9 * grid.voxel(name)) for name in "xyz")
    if case.kind == "cyst":
        _paint(volume, grid, c, semi, _CYST)
    elif case.kind == "calcification":
        _paint(volume, grid, c, semi, _CALCIFICATION)
    else:
        p0, p1, p2, p3 = case.texture
        k = 2.0 * np.pi / r  # about one texture period per radius: heterogeneous at any resolution

        def lobulated(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            return 1.0 + MASS_LOBULATION * np.sin(3.0 * np.arctan2(y - c[1], x - c[0]) + p0)

        def texture(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            t = np.sin(k * (x - c[0]) + p1) * np.sin(k * (y - c[1]) + p2) * np.sin(k * (z - c[2]) + p3)
            return (_MASS + _MASS_TEXTURE * t).astype(np.float32)

        _paint(volume, grid, c, semi, texture, radial=lobulated)
