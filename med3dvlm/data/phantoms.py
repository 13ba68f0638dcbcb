"""Embedded phantom dataset: synthetic abdominal CT volumes, reports and VQA in the exact M3D layout.

Every default config and test trains on this when no real data is given, so it must (1) match the
M3D-Cap / M3D-VQA layout byte for byte in names and columns (``med3dvlm.data.layout``), (2) be
deterministic (same parameters -> identical files), and (3) make its text *visually learnable*: each
report and answer states attributes that a small 3D CNN can read off a low-resolution volume.

What a case is
--------------
A stylised abdomen in atlas coordinates ``x, y, z`` in [-1, 1]: ``x`` runs from the patient's right
to left (radiological display: patient right on the image left), ``y`` from anterior to posterior,
``z`` from superior to inferior. Fixed anatomy (``ANATOMY``): body (elliptic cylinder with a fat
rim), lung bases, liver (patient right, upper), spleen (left, upper, posterior), two kidneys
(posterior), urinary bladder (pelvis), spine and abdominal aorta. Per case:

* ``plane``: axial / coronal / sagittal. The volume is sampled on a grid whose array axes
  ``(D, H, W)`` are ``(z, y, x)``, ``(y, z, x)`` or ``(x, z, y)``, so the plane is visible.
* ``phase``: non-contrast / arterial / portal venous. Sets organ and aorta enhancement
  (aorta about 0.42 / 0.95 / 0.72; liver brightest in the portal venous phase).
* One abnormal site (liver right or left lobe, spleen, right or left kidney) holding 1-3 lesions
  of one ``kind``: cyst (dark, 0.2), mass (bright 0.76-0.88, heterogeneous, lobulated) or
  calcification (very bright, 1.0, smaller); ``size`` small or large; a single lesion also has a
  ``level`` (upper or lower part / pole of its organ).

Volumes are float32 in [0, 1] (mild Gaussian noise, then quantised to 1/255 steps as 8-bit slices
are), shape ``(D, H, W)``. NIfTI files store ``(x, y, z) = (W, H, D)`` with an identity affine
(SPEC §6); ``.npy`` files hold ``(1, D, H, W)`` as M3D's release does. Both are written by
``med3dvlm.data.volumes.save_volume``.

On-disk layout under ``root``::

    M3D_Cap.json                          {"train"|"validation"|"test": [{"image", "text"}]}
    ct_case/000000/text.txt               the report (one paragraph)
    ct_case/000000/Axial_venous/volume.nii.gz   (series = Plane_{noncontrast|arterial|venous})
    M3D-VQA/M3D_VQA_{train,val,test}.csv        8 closed/open rows per case (types 1-5)
    M3D-VQA/M3D_VQA_yn_{train,val,test}.csv     6 yes/no rows per case (3 Yes, 3 No)
    .phantom.json                         marker: generator version, parameters, counts, files

Cases 0..n-1 are split in order: the first go to train, then validation, then test. A case's
attributes depend only on ``(seed, index)``, so a larger dataset extends a smaller one.

API: ``make_phantom_dataset(root, num_cases, shape, seed, volume_format, split_fractions, overwrite)``
writes (and replaces a previous phantom dataset at ``root``); ``ensure_phantom_dataset(root, ...)``
with the same parameters writes only if ``root`` does not already hold exactly that dataset (what
the training configs call, so data is generated once). Both return a ``PhantomDataset`` summary.
``sample_case``, ``render_volume`` and ``write_case_texts`` expose one case for demos and tests.

Command line (``python -m med3dvlm.data.phantoms --help``)::

    --root DIR            dataset root to write (required)
    --num-cases N         number of cases (default 40; at least 3)
    --shape D H W         volume shape (default 64 128 128; each in [16, max 128 256 256])
    --seed S              random seed (default 0)
    --format FMT          nii.gz (default) or npy
    --splits T V E        train/validation/test fractions (default 0.7 0.15 0.15)
    --overwrite           also write into a non-empty folder that is not a phantom dataset
    --if-missing          do nothing when the root already holds this exact dataset
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from med3dvlm.data import layout
from med3dvlm.data.preprocessing import PREPROCESSING_FILE, Preprocessing, write_preprocessing
from med3dvlm.data.volumes import save_volume
from med3dvlm.utils import write_atomic

__all__ = [
    "ANATOMY",
    "DEFAULT_NUM_CASES",
    "DEFAULT_SHAPE",
    "DEFAULT_SPLIT_FRACTIONS",
    "GENERATOR_VERSION",
    "LESION_KINDS",
    "MARKER_NAME",
    "MAX_SHAPE",
    "PHANTOM_HU_WINDOW",
    "PHASES",
    "PLANES",
    "PLANE_AXES",
    "Ellipsoid",
    "Lesion",
    "PhantomCase",
    "PhantomDataset",
    "ensure_phantom_dataset",
    "make_phantom_dataset",
    "phantom_preprocessing",
    "read_phantom_marker",
    "render_volume",
    "sample_case",
    "write_case_texts",
]

GENERATOR = "med3dvlm.data.phantoms"  # not __name__: that is "__main__" under `python -m`
GENERATOR_VERSION = 1
MARKER_NAME = ".phantom.json"
CASES_DIR = "ct_case"
DEFAULT_NUM_CASES = 40
DEFAULT_SHAPE = (64, 128, 128)
MAX_SHAPE = (128, 256, 256)
MIN_DIM = 16
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
VOLUME_FORMATS = ("nii.gz", "npy")
MIN_CASES = len(layout.CAP_SPLITS)
# Phantom intensities stand for HU through this linear map (0 = -1000 HU air, 1 = +1000 HU), so a
# phantom can be written as the HU NIfTI or DICOM series a scanner would give (tests, demos).
PHANTOM_HU_WINDOW = (-1000.0, 1000.0)

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

# Intensities in [0, 1] before noise.
_AIR, _LUNG, _FAT, _SOFT, _BONE, _URINE = 0.0, 0.06, 0.22, 0.38, 0.90, 0.24
_ENHANCEMENT = {  # phase -> structure -> intensity
    "non_contrast": {"liver": 0.48, "spleen": 0.46, "cortex": 0.44, "medulla": 0.44, "aorta": 0.42},
    "arterial": {"liver": 0.52, "spleen": 0.58, "cortex": 0.66, "medulla": 0.48, "aorta": 0.95},
    "portal_venous": {"liver": 0.62, "spleen": 0.60, "cortex": 0.62, "medulla": 0.58, "aorta": 0.72},
}
_CYST, _MASS, _MASS_TEXTURE, _CALCIFICATION = 0.20, 0.82, 0.06, 1.0
_MASS_LOBULATION = 0.12  # relative radius modulation of a mass margin
_NOISE_STD = 0.02
# Lesion radii (atlas units) by kind and size; each lesion gets +-10 %.
_RADIUS = {
    ("cyst", "small"): 0.09, ("cyst", "large"): 0.15,
    ("mass", "small"): 0.09, ("mass", "large"): 0.15,
    ("calcification", "small"): 0.065, ("calcification", "large"): 0.10,
}
_GAP = 0.06  # minimum gap between lesions, so a count stays countable at low resolution
_CM_PER_UNIT = 20.0  # nominal field of view 40 cm across [-1, 1], for sizes quoted in reports


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
        extent = radii * (1.0 + _MASS_LOBULATION if kind == "mass" else 1.0)
        for i in range(k):
            for j in range(i + 1, k):
                distance = np.linalg.norm(points[:, i] - points[:, j], axis=-1)
                ok &= distance >= extent[i] + extent[j] + _GAP
        valid = np.flatnonzero(ok)
        if valid.size:
            chosen = points[valid[0]]
            order = np.argsort(chosen[:, 2], kind="stable")  # superior first: stable text order
            return tuple(
                Lesion(tuple(round(float(v), 6) for v in chosen[i]), round(float(radii[i]), 6)) for i in order
            )
    raise RuntimeError(f"cannot place a {size} {kind} in {organ_key}")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# Volume rendering
# ----------------------------------------------------------------------------------------------
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

    ``radial(x, y, z)`` (at most ``1 + _MASS_LOBULATION``) optionally scales the boundary for
    lobulated margins; ``value`` may be a function of the coordinates (textures).
    """
    margin = 1.0 + _MASS_LOBULATION if radial is not None else 1.0
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
            return 1.0 + _MASS_LOBULATION * np.sin(3.0 * np.arctan2(y - c[1], x - c[0]) + p0)

        def texture(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            t = np.sin(k * (x - c[0]) + p1) * np.sin(k * (y - c[1]) + p2) * np.sin(k * (z - c[2]) + p3)
            return (_MASS + _MASS_TEXTURE * t).astype(np.float32)

        _paint(volume, grid, c, semi, texture, radial=lobulated)


# ----------------------------------------------------------------------------------------------
# Text: report and questions
# ----------------------------------------------------------------------------------------------
_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}
_KIND_PLURAL = {"cyst": "cysts", "mass": "masses", "calcification": "calcifications"}
_KIND_DESCRIPTORS = {
    "cyst": ("hypodense cyst", "well-defined hypodense cyst", "simple cyst", "fluid-density cyst"),
    "mass": (
        "hyperdense mass", "heterogeneous hyperdense mass", "lobulated hyperdense mass", "solid heterogeneous mass"
    ),
    "calcification": ("calcification", "dense calcification", "coarse calcification"),
}
_PHASE_NOUN = {
    "non_contrast": "non-contrast phase",
    "arterial": "arterial phase",
    "portal_venous": "portal venous phase",
}
_PHASE_ADJ = {"non_contrast": "non-contrast", "arterial": "arterial phase", "portal_venous": "portal venous phase"}
_PHASE_SENTENCES = {
    "non_contrast": ("No intravenous contrast was administered.",),
    "arterial": ("There is dense opacification of the aorta.", "The aorta is brightly opacified."),
    "portal_venous": ("The liver parenchyma is brightly enhanced.", "The aorta is moderately opacified."),
}
_INTROS = (
    "{Plane} CT of the abdomen in the {phase_noun}.",
    "{Plane} {phase_adj} CT images of the abdomen and pelvis.",
    "CT abdomen, {plane} images, {phase_noun}.",
    "{Phase_adj} CT of the abdomen, {plane} images.",
)
_FINDINGS = (
    "{Count} {size} {desc} {be} seen in {loc}{measure}.",
    "There {be} {count} {size} {desc}{measure} in {loc}.",
    "{Loc} contains {count} {size} {desc}{measure}.",
    "{Loc} demonstrates {count} {size} {desc}{measure}.",
)
_KIND_REMARKS = {
    "cyst": ("No solid component or septation.", "Fluid attenuation without a solid component."),
    "mass": ("Malignancy cannot be excluded; tissue sampling is advised.", "Further evaluation is recommended."),
    "calcification": {
        "kidney": ("No associated hydronephrosis.",),
        None: ("Likely sequela of prior granulomatous disease.",),
    },
}
_NORMAL = {
    "liver_clean": ("The liver is normal in size and attenuation.", "The liver is unremarkable."),
    "spleen": ("The spleen is unremarkable.", "The spleen is normal in size."),
    "kidneys": ("The kidneys are unremarkable.", "Both kidneys are normal in size and position."),
    "other_kidney": ("The {side} kidney is unremarkable.", "The {side} kidney appears normal."),
}
_CLOSING = (
    "No free fluid.",
    "No lymphadenopathy.",
    "The urinary bladder is unremarkable.",
    "The visualized lung bases are clear.",
    "The abdominal aorta is normal in caliber.",
)


def _location_phrase(case: PhantomCase, rng: np.random.Generator | None = None) -> str:
    """Where the lesions are, lower case, without article: 'upper pole of the left kidney'."""
    if case.organ == "liver":
        lobe = (
            f"{case.side} hepatic lobe"
            if rng is None or rng.random() < 0.5
            else f"{case.side} lobe of the liver"
        )
        return f"{case.level} part of the {lobe}" if case.level else lobe
    organ = "spleen" if case.organ == "spleen" else f"{case.side} kidney"
    return f"{case.level} pole of the {organ}" if case.level else organ


def _organ_phrase(case: PhantomCase) -> str:
    return f"{case.side} kidney" if case.organ == "kidney" else case.organ


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_report(case: PhantomCase, seed: int = 0) -> str:
    """A radiology-style report stating exactly the case's attributes, in varied phrasing."""
    rng = np.random.default_rng([seed, 4, case.index])
    words = {
        "plane": case.plane,
        "Plane": _cap(case.plane),
        "phase_noun": _PHASE_NOUN[case.phase],
        "phase_adj": _PHASE_ADJ[case.phase],
        "Phase_adj": _cap(_PHASE_ADJ[case.phase]),
    }
    sentences = [_pick(rng, _INTROS).format(**words)]
    if rng.random() < 0.5:
        sentences.append(_pick(rng, _PHASE_SENTENCES[case.phase]))
    n = case.count
    desc = _pick(rng, _KIND_DESCRIPTORS[case.kind])
    if n > 1:
        desc = desc[:-4] + "masses" if desc.endswith("mass") else desc + "s"
    diameter = max(lesion.radius for lesion in case.lesions) * 2.0 * _CM_PER_UNIT
    measure = ""
    if rng.random() < 0.7:
        measure = (
            f" measuring approximately {diameter:.1f} cm"
            if n == 1
            else f", the largest measuring {diameter:.1f} cm,"
        )
    template = _pick(rng, _FINDINGS)
    count_word = ("a single" if rng.random() < 0.3 else "a") if n == 1 else _NUMBER[n]
    loc = "the " + _location_phrase(case, rng)
    finding = template.format(
        Count=_cap(count_word),
        count=count_word,
        size=case.size,
        desc=desc,
        be="is" if n == 1 else "are",
        loc=loc,
        Loc=_cap(loc),
        measure=measure,
    )
    sentences.append(finding.replace(",.", "."))
    if rng.random() < 0.6:
        remarks = _KIND_REMARKS[case.kind]
        if isinstance(remarks, dict):
            remarks = remarks["kidney" if case.organ == "kidney" else None]
        sentences.append(_pick(rng, remarks))
    normal = []
    if case.organ != "liver":
        normal.append(_pick(rng, _NORMAL["liver_clean"]))
    if case.organ != "spleen":
        normal.append(_pick(rng, _NORMAL["spleen"]))
    if case.organ == "kidney":
        other = "left" if case.side == "right" else "right"
        normal.append(_pick(rng, _NORMAL["other_kidney"]).format(side=other))
    else:
        normal.append(_pick(rng, _NORMAL["kidneys"]))
    sentences.extend(normal[i] for i in rng.permutation(len(normal)))
    sentences.extend(_CLOSING[i] for i in sorted(rng.choice(len(_CLOSING), size=2, replace=False)))
    return " ".join(sentences)


# Closed/open question vocabularies: the answer is always one of the four choices.
_PLANE_ANSWERS = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
_PLANE_CHOICES = ("Axial", "Coronal", "Sagittal", "Oblique")
_PHASE_ANSWERS = {
    "non_contrast": "Non-contrast",
    "arterial": "Arterial phase",
    "portal_venous": "Portal venous phase",
}
_PHASE_CHOICES = ("Non-contrast", "Arterial phase", "Portal venous phase", "Delayed phase")
_ORGAN_CHOICES = ("Liver", "Spleen", "Kidney", "Pancreas", "Gallbladder", "Urinary bladder", "Stomach")
_KIND_ANSWERS = {"cyst": "Cyst", "mass": "Mass", "calcification": "Calcification"}
_KIND_EXTRA = ("Abscess", "Hematoma", "Lipoma")
_DENSITY_CHOICES = ("Hypodense", "Hyperdense", "Isodense", "Fat density")
_DENSITY_ANSWERS = {"cyst": "Hypodense", "mass": "Hyperdense", "calcification": "Hyperdense"}
_COUNT_CHOICES = ("One", "Two", "Three", "Four")


def _fine_locations() -> list[str]:
    names = [f"{lv} part of the {s} hepatic lobe" for s in ("right", "left") for lv in LEVELS]
    names += [f"{lv} pole of the spleen" for lv in LEVELS]
    names += [f"{lv} pole of the {s} kidney" for s in ("right", "left") for lv in LEVELS]
    return [_cap(n) for n in names]


_LOCATIONS_FINE = tuple(_fine_locations())
_LOCATIONS_COARSE = ("Right hepatic lobe", "Left hepatic lobe", "Spleen", "Right kidney", "Left kidney")

# Question templates by question; {organ}, {lesion}, {kinds}, {kind_np}, {be}, {do} filled per case.
_Q_PLANE = (
    "Which plane is this CT image displayed in?",
    "In which plane was this image reconstructed?",
    "What is the imaging plane of this scan?",
)
_Q_PHASE = (
    "In which contrast phase was this CT scan acquired?",
    "What is the phase of this CT scan?",
    "Which phase of contrast enhancement does this image show?",
)
_Q_ORGAN = (
    "Which organ contains the {lesion}?",
    "In which organ is the abnormality located?",
    "Which organ shows an abnormality in this image?",
)
_Q_KIND = (
    "What type of lesion is seen in the {organ}?",
    "What is the most likely abnormality in the {organ}?",
    "What abnormality is present in the {organ}?",
)
_Q_DENSITY = (
    "What is the attenuation of the {lesion} relative to the surrounding {organ}?",
    "How {do} the {lesion} appear compared with the {organ} parenchyma?",
)
_Q_DESCRIBE = (
    "Which description best fits the abnormality in the {organ}?",
    "How would you describe the {lesion} in the {organ}?",
)
_Q_COUNT = ("How many {kinds} are seen in the {organ}?", "What is the number of {kinds} in the {organ}?")
_Q_LOCATION = (
    "Where {be} the {kind_np} located?",
    "What is the location of the {kind_np}?",
    "Where in the abdomen is the abnormality?",
)


def _choices(
    rng: np.random.Generator, answer: str, pool: Sequence[str], letter: str, preferred: Sequence[str] = ()
) -> dict[str, str]:
    """Four distinct choices with ``answer`` at ``letter``; distractors prefer ``preferred``."""
    preferred = [p for p in preferred if p != answer]
    rest = [p for p in pool if p != answer and p not in preferred]
    preferred = [preferred[i] for i in rng.permutation(len(preferred))]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    distractors = (preferred + rest)[:3]
    distractors = [distractors[i] for i in rng.permutation(3)]
    out, it = {}, iter(distractors)
    for candidate in layout.ANSWER_LETTERS:
        out[candidate] = answer if candidate == letter else next(it)
    return out


def make_questions(
    case: PhantomCase, report: str, image: str, seed: int = 0
) -> tuple[list[list], list[list]]:
    """Closed/open rows (8 per case, letters exactly balanced) and yes/no rows (6, 3 Yes + 3 No)."""
    rng = np.random.default_rng([seed, 5, case.index])
    n = case.count
    organ = _organ_phrase(case)
    lesion = "lesion" if n == 1 else "lesions"
    kind_np = case.kind if n == 1 else _KIND_PLURAL[case.kind]
    be = "is" if n == 1 else "are"
    fmt = {
        "organ": organ,
        "lesion": lesion,
        "kinds": _KIND_PLURAL[case.kind],
        "kind_np": kind_np,
        "be": be,
        "do": "does" if n == 1 else "do",
    }
    size_kind = f"{_cap(case.size)} {case.kind}"
    size_kind_pool = [f"{_cap(s)} {k}" for k in LESION_KINDS for s in LESION_SIZES]
    other_size = "large" if case.size == "small" else "small"
    location = _cap(_location_phrase(case))
    location_pool = _LOCATIONS_FINE if case.level else _LOCATIONS_COARSE
    organ_word = "hepatic" if case.organ == "liver" else case.organ
    same_organ = [loc for loc in location_pool if organ_word in loc.lower()]
    organ_answer = _cap(case.organ)
    specs = [  # (type, question templates, answer, pool, preferred distractors)
        (1, _Q_PLANE, _PLANE_ANSWERS[case.plane], _PLANE_CHOICES, ()),
        (2, _Q_PHASE, _PHASE_ANSWERS[case.phase], _PHASE_CHOICES, ()),
        (3, _Q_ORGAN, organ_answer, _ORGAN_CHOICES, ("Liver", "Spleen", "Kidney")),
        (4, _Q_KIND, _KIND_ANSWERS[case.kind], (*_KIND_ANSWERS.values(), *_KIND_EXTRA), _KIND_ANSWERS.values()),
        (4, _Q_DENSITY, _DENSITY_ANSWERS[case.kind], _DENSITY_CHOICES, ()),
        (4, _Q_DESCRIBE, size_kind, size_kind_pool, (f"{_cap(other_size)} {case.kind}",)),
        (4, _Q_COUNT, _cap(_NUMBER[n]), _COUNT_CHOICES, ()),
        (5, _Q_LOCATION, location, location_pool, same_organ),
    ]
    letters = [layout.ANSWER_LETTERS[i % 4] for i in rng.permutation(2 * len(layout.ANSWER_LETTERS))]
    assert len(letters) == len(specs)
    closed = []
    for (qtype, templates, answer, pool, preferred), letter in zip(specs, letters):
        question = _pick(rng, templates).format(**fmt)
        choices = _choices(rng, answer, pool, letter, preferred)
        options = [choices[x] for x in layout.ANSWER_LETTERS]
        closed.append([image, report, qtype, question, *options, answer, letter])

    yes = layout.YES_NO_ANSWERS[0]
    answers = [layout.YES_NO_ANSWERS[i // 3] for i in rng.permutation(6)]

    def other(options: Sequence, truth: object) -> object:
        rest = [o for o in options if o != truth]
        return rest[int(rng.integers(len(rest)))]

    yes_no = []
    # 1 Plane
    plane = case.plane if answers[0] == yes else other(PLANES, case.plane)
    article = "an" if plane == "axial" else "a"
    q = _pick(rng, (f"Is this {article} {plane} image?", f"Is this image displayed in the {plane} plane?"))
    yes_no.append((1, q))
    # 2 Phase
    phase = case.phase if answers[1] == yes else other(PHASES, case.phase)
    q = {
        "non_contrast": "Was this scan performed without intravenous contrast?",
        "arterial": "Was this scan acquired in the arterial phase?",
        "portal_venous": "Was this scan acquired in the portal venous phase?",
    }[phase]
    yes_no.append((2, q))
    # 3 Organ
    if answers[2] == yes:
        asked = organ
    else:
        clean = ["liver", "spleen", "kidneys", "urinary bladder"]
        if case.organ == "kidney":
            other_kidney = "left kidney" if case.side == "right" else "right kidney"
            clean = ["liver", "spleen", "urinary bladder", other_kidney]
        else:
            clean.remove(case.organ)
        asked = clean[int(rng.integers(len(clean)))]
    does = "Do" if asked == "kidneys" else "Does"
    q = _pick(rng, (f"Is there an abnormality in the {asked}?", f"{does} the {asked} contain a lesion?"))
    yes_no.append((3, q))
    # 4 Abnormality: kind
    kind = case.kind if answers[3] == yes else other(LESION_KINDS, case.kind)
    article = "an" if kind[0] in "aeiou" else "a"
    if n == 1:
        q = f"Is the lesion in the {organ} {article} {kind}?"
    else:
        q = f"Are the lesions in the {organ} {_KIND_PLURAL[kind]}?"
    yes_no.append((4, q))
    # 5 Location
    loc = location if answers[4] == yes else other(location_pool, location)
    yes_no.append((5, f"{_cap(be)} the {kind_np} located in the {loc[0].lower() + loc[1:]}?"))
    # 4 Abnormality: size or count
    if rng.random() < 0.5:
        size = case.size if answers[5] == yes else other_size
        q = f"Is the {case.kind} in the {organ} {size}?" if n == 1 else f"Are the {kind_np} in the {organ} {size}?"
    else:
        m = n if answers[5] == yes else other((1, 2, 3), n)
        if m == 1:
            q = f"Is there exactly one {case.kind} in the {organ}?"
        else:
            q = f"Are there exactly {_NUMBER[m]} {_KIND_PLURAL[case.kind]} in the {organ}?"
    yes_no.append((4, q))
    yn_rows = [[image, report, qtype, q, a] for (qtype, q), a in zip(yes_no, answers)]
    return closed, yn_rows


def write_case_texts(case: PhantomCase, image: str, seed: int = 0) -> tuple[str, list[list], list[list]]:
    """Report, closed/open rows and yes/no rows of one case (``image`` = its relative path)."""
    report = make_report(case, seed)
    closed, yes_no = make_questions(case, report, image, seed)
    return report, closed, yes_no


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomDataset:
    """Where a generated phantom dataset lives and what it holds."""

    root: Path
    num_cases: int
    shape: tuple[int, int, int]
    seed: int
    volume_format: str
    split_cases: dict[str, int]
    split_vqa: dict[str, int]
    split_yes_no: dict[str, int]
    generated: bool  # False when ensure_phantom_dataset found it already there

    @property
    def cap_json(self) -> Path:
        return self.root / layout.CAP_JSON

    def vqa_csv(self, split: str) -> Path:
        return self.root / layout.VQA_DIR / layout.VQA_CSV[split]

    def vqa_yes_no_csv(self, split: str) -> Path:
        return self.root / layout.VQA_DIR / layout.VQA_YN_CSV[split]

    def summary(self) -> str:
        splits = " / ".join(f"{s} {self.split_cases[s]}" for s in layout.CAP_SPLITS)
        shape = "x".join(map(str, self.shape))
        return (
            f"phantom dataset at {self.root}: {self.num_cases} cases ({splits}), {shape} {self.volume_format}, "
            f"{sum(self.split_vqa.values())} closed/open QA, {sum(self.split_yes_no.values())} yes/no QA"
        )


def _normalise_params(
    num_cases: int, shape: Sequence[int], seed: int, volume_format: str, split_fractions: Sequence[float]
) -> dict:
    """Validated parameters in the form stored in the marker (JSON types)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (D, H, W), got {shape}")
    for dim, value, largest in zip("DHW", shape, MAX_SHAPE):
        if not MIN_DIM <= value <= largest:
            raise ValueError(
                f"shape {shape}: {dim} = {value} is outside [{MIN_DIM}, {largest}] "
                f"(each dimension at least {MIN_DIM}, at most {MAX_SHAPE})"
            )
    fmt = str(volume_format).lstrip(".")
    if fmt not in VOLUME_FORMATS:
        raise ValueError(f"volume_format must be one of {VOLUME_FORMATS}, got {volume_format!r}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three positive numbers summing to 1, got {split_fractions}")
    num_cases = int(num_cases)
    _split_sizes(num_cases, fractions)  # validates num_cases
    return {
        "num_cases": num_cases,
        "shape": list(shape),
        "seed": seed,
        "volume_format": fmt,
        "split_fractions": fractions,
    }


def _split_sizes(num_cases: int, fractions: Sequence[float]) -> dict[str, int]:
    """Case counts per split; every split non-empty."""
    n_val = max(1, round(num_cases * fractions[1]))
    n_test = max(1, round(num_cases * fractions[2]))
    n_train = num_cases - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"num_cases = {num_cases} is too small for split fractions {list(fractions)}: every split "
            f"needs at least one case (use at least {MIN_CASES} cases)"
        )
    return dict(zip(layout.CAP_SPLITS, (n_train, n_val, n_test)))


def read_phantom_marker(root: str | os.PathLike) -> dict | None:
    """The marker of a phantom dataset at ``root``, or None if there is none (or it is unreadable)."""
    path = Path(root) / MARKER_NAME
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        return None
    return marker


def phantom_preprocessing(shape: Sequence[int]) -> Preprocessing:
    """What the phantoms stand for as preprocessed CT: HU through ``PHANTOM_HU_WINDOW``, not cropped
    (the phantom is drawn at its final size), at ``shape``. Recorded in every phantom root, so a model
    trained on phantoms reads a phantom written as HU NIfTI or DICOM as the phantom itself."""
    return Preprocessing(hu_window=PHANTOM_HU_WINDOW, crop_foreground=False, shape=tuple(shape))


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("ascii")


def _csv_bytes(columns: Sequence[str], rows: list[list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue().encode("ascii")


def make_phantom_dataset(
    root: str | os.PathLike,
    num_cases: int = DEFAULT_NUM_CASES,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    volume_format: str = "nii.gz",
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
) -> PhantomDataset:
    """Write the phantom dataset to ``root`` (always, replacing a previous phantom dataset there).

    Refuses a non-empty ``root`` that holds no phantom marker unless ``overwrite``: a wrong path must
    not scribble over real data. Files of a previous phantom dataset that the new one does not
    write are removed. The marker says "complete" only at the end, so an interrupted run is redone
    by ``ensure_phantom_dataset``.
    """
    params = _normalise_params(num_cases, shape, seed, volume_format, split_fractions)
    root = Path(root)
    previous = read_phantom_marker(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder")
    if previous is None and root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{root} is not empty and holds no phantom dataset ({MARKER_NAME} missing); "
            "choose an empty folder or pass overwrite=True (--overwrite)"
        )
    root.mkdir(parents=True, exist_ok=True)

    shape = tuple(params["shape"])
    sizes = _split_sizes(params["num_cases"], params["split_fractions"])
    split_of = [s for s in layout.CAP_SPLITS for _ in range(sizes[s])]
    cases = [sample_case(params["seed"], index) for index in range(params["num_cases"])]
    images = [f"{CASES_DIR}/{c.case_id}/{c.series}/volume.{params['volume_format']}" for c in cases]
    texts = [f"{CASES_DIR}/{c.case_id}/text.txt" for c in cases]
    tables = [f"{layout.VQA_DIR}/{layout.VQA_CSV[s]}" for s in layout.CAP_SPLITS]
    tables += [f"{layout.VQA_DIR}/{layout.VQA_YN_CSV[s]}" for s in layout.CAP_SPLITS]
    files = sorted(images + texts + tables + [layout.CAP_JSON, PREPROCESSING_FILE])
    # An incomplete marker first: it claims the root (so a rerun may write there) and lists every
    # file this run or the previous one may have written (so a rerun can clean them up).
    old_files = set(previous.get("files", [])) if previous else set()
    marker = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "complete": False,
        "params": params,
        "files": sorted(old_files | set(files)),
    }
    write_atomic(root / MARKER_NAME, _json_bytes(marker))

    cap: dict[str, list[dict[str, str]]] = {s: [] for s in layout.CAP_SPLITS}
    vqa: dict[str, list[list]] = {s: [] for s in layout.CAP_SPLITS}
    yes_no: dict[str, list[list]] = {s: [] for s in layout.CAP_SPLITS}
    for case, split, image, text in zip(cases, split_of, images, texts):
        save_volume(render_volume(case, shape, params["seed"]), root / image)
        report, closed, yn = write_case_texts(case, image, params["seed"])
        write_atomic(root / text, (report + "\n").encode("ascii"))
        cap[split].append({"image": image, "text": text})
        vqa[split].extend(closed)
        yes_no[split].extend(yn)
    write_atomic(root / layout.CAP_JSON, _json_bytes(cap))
    for split in layout.CAP_SPLITS:
        vqa_dir = root / layout.VQA_DIR
        write_atomic(vqa_dir / layout.VQA_CSV[split], _csv_bytes(layout.VQA_COLUMNS, vqa[split]))
        write_atomic(vqa_dir / layout.VQA_YN_CSV[split], _csv_bytes(layout.VQA_YN_COLUMNS, yes_no[split]))

    _remove_stale(root, old_files - set(files))
    write_preprocessing(root, phantom_preprocessing(shape))
    marker["complete"] = True
    marker["files"] = files
    marker["counts"] = {
        "cases": sizes,
        "vqa": {s: len(vqa[s]) for s in layout.CAP_SPLITS},
        "yes_no": {s: len(yes_no[s]) for s in layout.CAP_SPLITS},
    }
    write_atomic(root / MARKER_NAME, _json_bytes(marker))
    return _dataset(root, marker, generated=True)


def _remove_stale(root: Path, stale: set[str]) -> None:
    """Delete files only a previous phantom dataset wrote, and folders left empty by that."""
    resolved_root = root.resolve()
    for relative in sorted(stale):
        path = (root / relative).resolve()
        if resolved_root not in path.parents:
            continue  # never follow a marker outside the root
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == resolved_root:
                break
            try:
                parent.rmdir()
            except OSError:
                break


def _dataset(root: Path, marker: dict, generated: bool) -> PhantomDataset:
    params, counts = marker["params"], marker["counts"]
    return PhantomDataset(
        root=root,
        num_cases=params["num_cases"],
        shape=tuple(params["shape"]),
        seed=params["seed"],
        volume_format=params["volume_format"],
        split_cases=dict(counts["cases"]),
        split_vqa=dict(counts["vqa"]),
        split_yes_no=dict(counts["yes_no"]),
        generated=generated,
    )


def ensure_phantom_dataset(
    root: str | os.PathLike,
    num_cases: int = DEFAULT_NUM_CASES,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    volume_format: str = "nii.gz",
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
) -> PhantomDataset:
    """Generate the dataset only if ``root`` does not already hold it (generate-once for configs).

    "Holds it" means a marker with the same generator version and parameters and every file it
    lists present. Concurrent callers (e.g. several ranks) write identical bytes via atomic
    replaces, so racing is wasteful but safe.
    """
    params = _normalise_params(num_cases, shape, seed, volume_format, split_fractions)
    root = Path(root)
    marker = read_phantom_marker(root)
    if (
        marker is not None
        and marker.get("version") == GENERATOR_VERSION
        and marker.get("complete") is True
        and marker.get("params") == params
        and all((root / f).is_file() for f in marker.get("files", []))
    ):
        return _dataset(root, marker, generated=False)
    return make_phantom_dataset(root, overwrite=overwrite, **params)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m med3dvlm.data.phantoms",
        description="Write the embedded phantom dataset (synthetic CT volumes, reports, VQA) in the M3D layout.",
        epilog=f"Writes {layout.CAP_JSON}, {CASES_DIR}/NNNNNN/{{text.txt,SERIES/volume.FMT}}, "
        f"{layout.VQA_DIR}/*.csv and the marker {MARKER_NAME} under ROOT.",
    )
    shape = " ".join(map(str, DEFAULT_SHAPE))
    largest = " ".join(map(str, MAX_SHAPE))
    add = parser.add_argument
    add("--root", required=True, type=Path, help="dataset root to write")
    add("--num-cases", type=int, default=DEFAULT_NUM_CASES,
        help=f"number of cases (default {DEFAULT_NUM_CASES}, at least {MIN_CASES})")
    add("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"),
        help=f"volume shape (default {shape}; each at least {MIN_DIM}, at most {largest})")
    add("--seed", type=int, default=0, help="random seed (default 0)")
    add("--format", dest="volume_format", choices=VOLUME_FORMATS, default="nii.gz",
        help="volume file format (default nii.gz)")
    add("--splits", type=float, nargs=3, default=list(DEFAULT_SPLIT_FRACTIONS), metavar=("TRAIN", "VAL", "TEST"),
        help="train/validation/test fractions (default 0.7 0.15 0.15)")
    add("--overwrite", action="store_true", help="write even into a non-empty folder that is not a phantom dataset")
    add("--if-missing", action="store_true", help="do nothing if ROOT already holds this exact dataset")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    build = ensure_phantom_dataset if args.if_missing else make_phantom_dataset
    start = time.perf_counter()
    try:
        dataset = build(
            args.root,
            num_cases=args.num_cases,
            shape=args.shape,
            seed=args.seed,
            volume_format=args.volume_format,
            split_fractions=args.splits,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    action = "wrote" if dataset.generated else "found"
    print(f"{action} {dataset.summary()} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
