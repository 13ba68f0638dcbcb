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

Modules by job: ``anatomy`` (the atlas, a case's attributes and lesions), ``rendering`` (the
volume), ``text`` (report and questions), ``dataset`` (writing a root, the marker).

Command line: ``python -m med3dvlm.phantoms root=DIR`` (:mod:`med3dvlm.phantoms`, ``--help``).
"""

from med3dvlm.data.phantoms.anatomy import (
    ANATOMY,
    AORTA,
    BODY_SEMI_XY,
    FAT_RIM,
    LESION_KINDS,
    LESION_SIZES,
    LEVELS,
    PHASES,
    PLANE_AXES,
    PLANES,
    SITES,
    SPINE,
    Ellipsoid,
    Lesion,
    PhantomCase,
    sample_case,
)
from med3dvlm.data.phantoms.dataset import (
    CASES_DIR,
    DEFAULT_NUM_CASES,
    DEFAULT_SHAPE,
    DEFAULT_SPLIT_FRACTIONS,
    GENERATOR,
    GENERATOR_VERSION,
    MARKER_NAME,
    MAX_SHAPE,
    MIN_CASES,
    MIN_DIM,
    PHANTOM_HU_WINDOW,
    VOLUME_FORMATS,
    PhantomDataset,
    ensure_phantom_dataset,
    make_phantom_dataset,
    phantom_preprocessing,
    read_phantom_marker,
)
from med3dvlm.data.phantoms.rendering import render_volume
from med3dvlm.data.phantoms.text import make_questions, make_report, write_case_texts

__all__ = [
    "ANATOMY",
    "AORTA",
    "BODY_SEMI_XY",
    "CASES_DIR",
    "DEFAULT_NUM_CASES",
    "DEFAULT_SHAPE",
    "DEFAULT_SPLIT_FRACTIONS",
    "FAT_RIM",
    "GENERATOR",
    "GENERATOR_VERSION",
    "LESION_KINDS",
    "LESION_SIZES",
    "LEVELS",
    "MARKER_NAME",
    "MAX_SHAPE",
    "MIN_CASES",
    "MIN_DIM",
    "PHANTOM_HU_WINDOW",
    "PHASES",
    "PLANES",
    "PLANE_AXES",
    "SITES",
    "SPINE",
    "VOLUME_FORMATS",
    "Ellipsoid",
    "Lesion",
    "PhantomCase",
    "PhantomDataset",
    "ensure_phantom_dataset",
    "make_phantom_dataset",
    "make_questions",
    "make_report",
    "phantom_preprocessing",
    "read_phantom_marker",
    "render_volume",
    "sample_case",
    "write_case_texts",
]
