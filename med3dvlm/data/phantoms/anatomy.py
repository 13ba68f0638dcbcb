"""The phantoms' atlas and what one case is: vocabulary, fixed anatomy, sampled attributes and lesions.

Atlas coordinates ``x, y, z`` in [-1, 1] (package docstring). A case's attributes depend only on
``(seed, index)``, so a larger dataset extends a smaller one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
PLANES = ("axial", "coronal", "sagittal")
PHASES = ("non_contrast", "arterial", "portal_venous")
LESION_KINDS = ("cyst", "mass", "calcification")
LESION_SIZES = ("small", "large")
LEVELS = ("upper", "lower")
# Abnormal sites: (organ, side). The spleen has no side.
SITES = (("liver", "right"), ("liver", "left"), ("spleen", None), ("kidney", "right"), ("kidney", "left"))

# Array axes (D, H, W) -> atlas axis, per plane (radiological display conventions).
PLANE_AXES = {"axial": ("z", "y", "x"), "coronal": ("y", "z", "x"), "sagittal": ("x", "z", "y")}
_SERIES_PLANE = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
_SERIES_PHASE = {"non_contrast": "noncontrast", "arterial": "arterial", "portal_venous": "venous"}


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in atlas coordinates (x, y, z)."""

    center: tuple[float, float, float]
    semi: tuple[float, float, float]


# The fixed atlas. Organ ellipsoids avoid the aorta and spine and are painted after the lungs, so
# inside one there are only organ intensities (a kidney pole touches the liver tip) and lesions.
ANATOMY = {
    "right_lung": Ellipsoid((-0.42, 0.08, -1.0), (0.34, 0.42, 0.44)),
    "left_lung": Ellipsoid((0.42, 0.08, -1.0), (0.34, 0.42, 0.44)),
    "liver": Ellipsoid((-0.36, -0.08, -0.30), (0.40, 0.42, 0.42)),
    "spleen": Ellipsoid((0.50, 0.20, -0.42), (0.18, 0.20, 0.34)),
    "right_kidney": Ellipsoid((-0.40, 0.30, 0.22), (0.16, 0.16, 0.34)),
    "left_kidney": Ellipsoid((0.40, 0.30, 0.22), (0.16, 0.16, 0.34)),
    "bladder": Ellipsoid((0.0, -0.18, 0.80), (0.26, 0.22, 0.20)),
}
BODY_SEMI_XY = (0.88, 0.62)  # elliptic cylinder along z
FAT_RIM = 0.9  # inner/outer semi-axis ratio of the subcutaneous fat rim
SPINE = ((0.0, 0.42), 0.10)  # (x, y) centre, radius; full z length
AORTA = ((0.10, 0.16), 0.055, (-1.0, 0.5))  # (x, y) centre, radius, z range (bifurcation at 0.5)

MASS_LOBULATION = 0.12  # relative radius modulation of a mass margin
# Lesion radii (atlas units) by kind and size; each lesion gets +-10 %.
_RADIUS = {
    ("cyst", "small"): 0.09,
    ("cyst", "large"): 0.15,
    ("mass", "small"): 0.09,
    ("mass", "large"): 0.15,
    ("calcification", "small"): 0.065,
    ("calcification", "large"): 0.10,
}
_GAP = 0.06  # minimum gap between lesions, so a count stays countable at low resolution
CM_PER_UNIT = 20.0  # nominal field of view 40 cm across [-1, 1], for sizes quoted in reports


# ----------------------------------------------------------------------------------------------
# Case attributes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lesion:
    """A round lesion in atlas coordinates."""

    center: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class PhantomCase:
    """The sampled attributes of one case; volume, report and questions all derive from it."""

    index: int
    plane: str
    phase: str
    organ: str  # liver | spleen | kidney
    side: str | None  # right | left (liver lobe or kidney); None for the spleen
    kind: str
    size: str
    level: str | None  # upper | lower for a single lesion, else None
    lesions: tuple[Lesion, ...]
    texture: tuple[float, ...]  # random phases of the mass margin and texture

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def case_id(self) -> str:
        return f"{self.index:06d}"

    @property
    def series(self) -> str:
        return f"{_SERIES_PLANE[self.plane]}_{_SERIES_PHASE[self.phase]}"


def _organ_key(organ: str, side: str | None) -> str:
    return f"{side}_kidney" if organ == "kidney" else organ


def _deck(seed: int, stream: int, options: Sequence, index: int) -> object:
    """Option of case ``index`` from a shuffled deck (blocks of permutations).

    Balances each attribute over the dataset without tying attributes to each other, and depends
    only on (seed, stream, index), so more cases extend fewer.
    """
    block, position = divmod(index, len(options))
    rng = np.random.default_rng([seed, 1, stream, block])
    return options[int(rng.permutation(len(options))[position])]


def sample_case(seed: int, index: int) -> PhantomCase:
    """Sample the attributes and lesion geometry of case ``index``."""
    plane = _deck(seed, 0, PLANES, index)
    phase = _deck(seed, 1, PHASES, index)
    organ, side = _deck(seed, 2, SITES, index)
    kind = _deck(seed, 3, LESION_KINDS, index)
    size = _deck(seed, 4, LESION_SIZES, index)
    count = _deck(seed, 5, (1, 2, 3), index)
    if size == "large" and organ in ("kidney", "spleen"):
        count = min(count, 2)  # three large lesions do not fit a kidney or the spleen
    rng = np.random.default_rng([seed, 2, index])
    level = LEVELS[int(rng.integers(2))]
    lobe = side if organ == "liver" else None
    lesions = _place_lesions(rng, _organ_key(organ, side), lobe, level, kind, size, count)
    texture = tuple(float(v) for v in rng.uniform(0.0, 2.0 * np.pi, size=4))
    return PhantomCase(
        index=index,
        plane=plane,
        phase=phase,
        organ=organ,
        side=side,
        kind=kind,
        size=size,
        level=level if len(lesions) == 1 else None,
        lesions=lesions,
        texture=texture,
    )


def _place_lesions(
    rng: np.random.Generator, organ_key: str, lobe: str | None, level: str, kind: str, size: str, count: int
) -> tuple[Lesion, ...]:
    """Non-overlapping lesion centres inside the organ (and lobe / level), vectorised rejection.

    Draws many candidate tuples at once and keeps the first valid one; if none fits, one lesion
    fewer is placed (the text is written from the lesions actually placed, so it stays true).
    """
    organ = ANATOMY[organ_key]
    center, semi = np.array(organ.center), np.array(organ.semi)
    for k in range(count, 0, -1):
        radii = _RADIUS[(kind, size)] * rng.uniform(0.9, 1.1, size=k)
        trials = 8192
        core = np.maximum(semi[None, None, :] - 0.7 * radii[None, :, None], 0.02)  # (1, k, 3)
        direction = rng.standard_normal((trials, k, 3))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        unit = direction * rng.uniform(0.0, 1.0, (trials, k, 1)) ** (1.0 / 3.0)
        ok = np.ones(trials, dtype=bool)
        if lobe:  # liver lobes split at the liver centre: right lobe = patient right = smaller x
            unit[..., 0] = np.abs(unit[..., 0]) * (-1.0 if lobe == "right" else 1.0)
            ok &= (np.abs(unit[..., 0]) >= 0.25).all(axis=1)
        if k == 1:  # a single lesion has a stated level: upper = superior = smaller z
            unit[..., 2] = np.abs(unit[..., 2]) * (-1.0 if level == "upper" else 1.0)
            ok &= np.abs(unit[:, 0, 2]) >= 0.35
        points = center + unit * core  # (trials, k, 3)
        extent = radii * (1.0 + MASS_LOBULATION if kind == "mass" else 1.0)
        for i in range(k):
            for j in range(i + 1, k):
                distance = np.linalg.norm(points[:, i] - points[:, j], axis=-1)
                ok &= distance >= extent[i] + extent[j] + _GAP
        valid = np.flatnonzero(ok)
        if valid.size:
            chosen = points[valid[0]]
            order = np.argsort(chosen[:, 2], kind="stable")  # superior first: stable text order
            return tuple(Lesion(tuple(round(float(v), 6) for v in chosen[i]), round(float(radii[i]), 6)) for i in order)
    raise RuntimeError(f"cannot place a {size} {kind} in {organ_key}")  # pragma: no cover
