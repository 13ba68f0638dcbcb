"""Data: volume I/O, M3D readers, transforms and DataModules (SPEC §6)."""

from __future__ import annotations

from typing import Any

from med3dvlm.data.datamodules import (
    FINETUNE_TASKS,
    PRETRAIN_TASKS,
    M3DCapDataModule,
    M3DVQADataModule,
    MixtureDataModule,
    VolumeTextDataset,
    collate_samples,
    drop_skipped,
)
from med3dvlm.data.errors import (
    CorruptFileError,
    DataError,
    InvalidRecordError,
    MissingColumnsError,
    MissingFileError,
    NonFiniteValuesError,
    UnknownFormatError,
    UnsafePathError,
    VolumeShapeError,
)
from med3dvlm.data.m3d import (
    ReadResult,
    SkippedSample,
    read_cap_json,
    read_task_split,
    read_vqa_csv,
    read_vqa_yes_no_csv,
)
from med3dvlm.data.samples import TASKS, Sample
from med3dvlm.data.transforms import eval_transforms, train_transforms
from med3dvlm.data.volumes import load_volume, save_volume

__all__ = [
    "FINETUNE_TASKS",
    "PRETRAIN_TASKS",
    "TASKS",
    "CorruptFileError",
    "DataError",
    "InvalidRecordError",
    "M3DCapDataModule",
    "M3DVQADataModule",
    "MissingColumnsError",
    "MissingFileError",
    "MixtureDataModule",
    "NonFiniteValuesError",
    "ReadResult",
    "Sample",
    "SkippedSample",
    "UnknownFormatError",
    "UnsafePathError",
    "VolumeShapeError",
    "VolumeTextDataset",
    "collate_samples",
    "drop_skipped",
    "eval_transforms",
    "load_volume",
    "make_phantom_dataset",
    "read_cap_json",
    "read_task_split",
    "read_vqa_csv",
    "read_vqa_yes_no_csv",
    "save_volume",
    "train_transforms",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: phantoms.py builds on this package, and importing it lazily keeps
    # `import med3dvlm.data` cheap and free of import cycles.
    if name == "make_phantom_dataset":
        from med3dvlm.data.phantoms import make_phantom_dataset

        return make_phantom_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
