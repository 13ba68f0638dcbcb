"""How every model folder of the project is written: the weights as safetensors, then the JSON
record that says how to rebuild them (``encoder.json``, ``projector.json``, ``med3dvlm.json``,
``med3dvlm_clip.json``). Each file appears under its final name whole or not at all, and the record
comes last, so a folder with a record holds its weights: a run killed while handing over never
leaves a stage a half-written file to load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from med3dvlm.utils import atomic_path, json_bytes, write_atomic


def write_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> Path:
    """``state`` (detached, on the CPU) as one safetensors file at ``path``."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary))
    return Path(path)


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """``record`` as indented JSON at ``path``."""
    return write_atomic(path, json_bytes(record))
