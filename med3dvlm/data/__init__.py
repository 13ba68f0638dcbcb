"""Data: volume I/O, M3D readers, transforms, DataModules and the phantom dataset (SPEC §6).

Names are imported on first use, so ``python -m med3dvlm.phantoms`` and the readers start
without loading Lightning or MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datamodules": (
        "FINETUNE_TASKS", "PRETRAIN_TASKS", "M3DCapDataModule", "M3DVQADataModule", "MixtureDataModule",
        "VolumeTextDataset", "collate_samples", "drop_skipped",
    ),
    "errors": (
        "CorruptFileError", "DataError", "InvalidRecordError", "MissingColumnsError", "MissingFileError",
        "NonFiniteValuesError", "UnknownFormatError", "UnsafePathError", "VolumeShapeError",
    ),
    "m3d": ("ReadResult", "SkippedSample", "read_cap_json", "read_vqa_csv", "read_vqa_yes_no_csv"),
    "tasks": ("read_task_split",),
    "samples": ("TASKS", "Sample"),
    "transforms": ("eval_transforms", "train_transforms"),
    "volumes": ("load_volume", "save_volume"),
    "ct": ("CTScan", "DicomSeriesError", "SeveralSeriesError", "list_series", "load_ct"),
    "preprocessing": ("Preprocessing", "read_preprocessing", "write_preprocessing"),
    "phantoms": ("make_phantom_dataset", "ensure_phantom_dataset"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"med3dvlm.data.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
