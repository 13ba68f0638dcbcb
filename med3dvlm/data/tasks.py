"""One task's samples of one split, from whichever layout the data root has: M3D-Cap / M3D-VQA
(:mod:`med3dvlm.data.m3d`) or a prepared CT-RATE root with 3D-RAD questions (:mod:`med3dvlm.data.rad3d`).

The DataModules, the evaluation and ``prepare convert`` read through here, so a new layout is one
more branch, and neither reader imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.m3d import (
    OnBadSample,
    ReadResult,
    read_cap_json,
    read_vqa_csv,
    read_vqa_yes_no_csv,
)
from med3dvlm.data.rad3d import is_rad3d_root, read_rad3d_split
from med3dvlm.data.samples import TASKS


def read_task_split(
    root: str | os.PathLike,
    task: str,
    split: str,
    on_bad_sample: OnBadSample = "error",
    volume_format: str | None = None,
    closed_answer_format: str = layout.CLOSED_ANSWER_FORMAT,
) -> ReadResult:
    """Samples of one task (``layout``-defined file under ``root``) and split."""
    root = Path(root)
    if split not in layout.CAP_SPLITS:
        raise ValueError(f"split must be one of {layout.CAP_SPLITS}, got {split!r}")
    vqa_dir = root / layout.VQA_DIR
    if task == "caption":
        return read_cap_json(root, split, on_bad_sample, volume_format)
    if task in TASKS and is_rad3d_root(root):  # a prepared CT-RATE root: its questions are 3D-RAD's
        return read_rad3d_split(root, task, split, on_bad_sample, volume_format, closed_answer_format)
    if task in ("vqa_closed", "vqa_open"):
        mode = task.removeprefix("vqa_")
        return read_vqa_csv(
            vqa_dir / layout.VQA_CSV[split], root, mode, on_bad_sample, volume_format, closed_answer_format
        )
    if task == "vqa_yes_no":
        return read_vqa_yes_no_csv(vqa_dir / layout.VQA_YN_CSV[split], root, on_bad_sample, volume_format)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
