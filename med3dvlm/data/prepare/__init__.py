"""Turn raw M3D-Cap cases, or CT volumes in Hounsfield units, into a dataset in the M3D layout.

What a raw case is (SPEC §6): one folder per case holding a report text file (``text.txt``) and one
sub-folder per series of numbered 2D slices (``0.png, 1.png, ...``, PNG or JPEG). A series may also
be a NIfTI file in the case folder, and a NIfTI file directly in the raw folder is a case of its
own (its report, if any, is ``<name>.txt`` beside it): that is how users bring their own CT.

What preparation does to a series (SPEC §6):

* slices: read as greyscale, keep those of the most common shape (ties: the shape of the earliest
  slice), stack in numeric order as ``(D, H, W)``, scale by min and max to [0, 1];
* NIfTI in HU: reorient to axial display order (slices head to feet, rows front to back, columns
  patient right to left; ``reorient=false`` keeps the file's axes), clip to the HU window and scale
  it to [0, 1] (``hu_window=null``: by min and max, e.g. for MRI); spacing is not used, as in M3D;
* then crop to the foreground (voxels > 0) and resize trilinearly to ``shape`` (128 x 256 x 256).

Report text: what follows ``study_findings:``, else what follows ``discussion:``, else the whole
text (the first of these that is not empty), newlines folded. Series names become ASCII.

Output under ``out_dir`` (``cases_dir`` = ``ct_case`` by default)::

    M3D_Cap.json                          every prepared series, split by case (``assign_split``)
    ct_case/000006/text.txt               the extracted report
    ct_case/000006/Axial_C__portal_venous_phase.nii.gz   float32 [0, 1], M3D's naming
    ct_case/000006/Axial_C__portal_venous_phase.nii      the fast copy (uint8, scl_slope 1/255)
    ct_case/000006/.prepared.json         the case's manifest, written last: the case is finished
    M3D-VQA/*.csv                         with ``vqa_dir``: M3D's CSVs, ``.npy`` paths -> ``.nii.gz``

(``series_layout=folder`` writes ``ct_case/000006/<series>/volume.nii.gz`` instead.)

Resuming: a case whose manifest matches the settings and raw series, and whose files all exist, is
skipped. Every file is written to a temporary name and renamed, so a killed run leaves no
half-written file under a final name; temporary leftovers are removed when the case is redone.

Splits: a case (with all its series) goes to the split given by a hash of ``seed`` and its folder
(``assign_split``), so the split of a case never changes when cases are added or removed; or to the
split an existing ``split.file`` lists it in.

``convert_dataset`` adds fast (or other format) copies of every volume an already prepared
dataset lists. Both run over the available cores and end with a ``Summary``.

Modules: ``settings`` (errors, settings, splits, names), ``cases`` (one case, its manifest),
``pipeline`` (run the cases, ``M3D_Cap.json``, the summary); one per source: ``slices`` (M3D's
PNG/JPEG series), ``nifti``, ``dicom``, ``folders`` (raw case folders: ``prepare_dataset``),
``ct_rate`` (``prepare_ct_rate``); ``vqa`` (M3D-VQA's CSVs), ``convert`` (``convert_dataset``) and
``config`` (``run_from_config``, what ``python -m med3dvlm.prepare`` runs).
"""

from med3dvlm.data.prepare.cases import CaseJob, CaseResult, SeriesSource, is_prepared, prepare_case, read_manifest
from med3dvlm.data.prepare.config import run_from_config
from med3dvlm.data.prepare.convert import ConvertJob, convert_dataset, convert_volume, listed_volumes
from med3dvlm.data.prepare.ct_rate import CT_RATE_HU_WINDOW, DEFAULT_TEST_FRACTION, prepare_ct_rate
from med3dvlm.data.prepare.dicom import dicom_series
from med3dvlm.data.prepare.folders import find_cases, prepare_dataset, read_reports_csv
from med3dvlm.data.prepare.nifti import NIFTI_SUFFIXES
from med3dvlm.data.prepare.pipeline import Summary, check_folders, run_cases, write_cap_json
from med3dvlm.data.prepare.settings import (
    DEFAULT_SPLIT_FRACTIONS,
    DISCUSSION_MARKER,
    FINDINGS_MARKER,
    FOLDER_LAYOUT_VOLUME,
    MANIFEST_NAME,
    PREPARATION_VERSION,
    PREPARE_SOURCES,
    REPORT_NAME,
    ROOT_MARKER,
    SERIES_LAYOUTS,
    CaseError,
    PreparationError,
    PrepareSettings,
    SeriesError,
    SplitRule,
    ascii_name,
    assign_split,
    extract_report,
    read_split_file,
)
from med3dvlm.data.prepare.slices import SLICE_SUFFIXES, numbered_slices, read_slice, stack_slices
from med3dvlm.data.prepare.vqa import rewrite_vqa_csvs

# The preprocessing's and the volumes' names that callers of this package have used from here.
from med3dvlm.data.preprocessing import DEFAULT_HU_WINDOW, PREPARED_SHAPE, crop_and_resize, scale_min_max
from med3dvlm.data.volumes import FAST_VOLUME_FORMAT

__all__ = [
    "CT_RATE_HU_WINDOW",
    "DEFAULT_HU_WINDOW",
    "DEFAULT_SPLIT_FRACTIONS",
    "DEFAULT_TEST_FRACTION",
    "DISCUSSION_MARKER",
    "FAST_VOLUME_FORMAT",
    "FINDINGS_MARKER",
    "FOLDER_LAYOUT_VOLUME",
    "MANIFEST_NAME",
    "NIFTI_SUFFIXES",
    "PREPARATION_VERSION",
    "PREPARED_SHAPE",
    "PREPARE_SOURCES",
    "REPORT_NAME",
    "ROOT_MARKER",
    "SERIES_LAYOUTS",
    "SLICE_SUFFIXES",
    "CaseError",
    "CaseJob",
    "CaseResult",
    "ConvertJob",
    "PreparationError",
    "PrepareSettings",
    "SeriesError",
    "SeriesSource",
    "SplitRule",
    "Summary",
    "ascii_name",
    "assign_split",
    "check_folders",
    "convert_dataset",
    "convert_volume",
    "crop_and_resize",
    "dicom_series",
    "extract_report",
    "find_cases",
    "is_prepared",
    "listed_volumes",
    "numbered_slices",
    "prepare_case",
    "prepare_ct_rate",
    "prepare_dataset",
    "read_manifest",
    "read_reports_csv",
    "read_slice",
    "read_split_file",
    "rewrite_vqa_csvs",
    "run_cases",
    "run_from_config",
    "scale_min_max",
    "stack_slices",
    "write_cap_json",
]
