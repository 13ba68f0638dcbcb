"""The model of a ``predict`` run: loaded from any folder users have, and identified for resuming.

``model_dir`` is an export folder (``python -m med3dvlm.export``), a training checkpoint (``.ckpt``)
or a released folder (``config.json`` + weights, SPEC §8): the released VLM (``model_type``
``vlm_qwen``, a ``vision_tower``) or the released DCFormer_SigLIP. Either way the result is the
:mod:`med3dvlm.api` wrapper (:class:`RetrievalModel` / :class:`VisionLanguageModel`).

:func:`model_fingerprint` says which model made a predictions file: its absolute path and a hash
of its configuration files and of its weight files' sizes and first and last MiB (cheap for a 15 GB
checkpoint, yet different for retrained weights), stored in the file's sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from med3dvlm.api import Model, RetrievalModel, VisionLanguageModel, load_model
from med3dvlm.data.preprocessing import Preprocessing, as_preprocessing

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
CONFIG_SUFFIXES = (".json", ".yaml", ".txt", ".model")  # configs, tokenizers, preprocessing.json
HASHED_EDGE_BYTES = 2**20  # of each weight file: the first and the last MiB
# The released VLM's config.json says so by one of these (interop.vlm reads them).
RELEASED_VLM_MARKERS = ("vision_tower", "mm_projector_type", "mm_hidden_size")


def is_released_folder(path: Path) -> bool:
    from med3dvlm.models.contrastive import CONTRASTIVE_CONFIG_FILE
    from med3dvlm.models.vlm import VLM_CONFIG_FILE

    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and not (path / VLM_CONFIG_FILE).is_file()
        and not (path / CONTRASTIVE_CONFIG_FILE).is_file()
    )


def load_predict_model(
    path: str | os.PathLike, dtype: str | None = None, preprocessing: Preprocessing | dict | None = None
) -> Model:
    """The model at ``path`` (module docstring) in eval mode on the CPU; ``preprocessing`` replaces
    the recorded one for raw input (a released model records none)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model_dir={path} does not exist: give an export folder, a training checkpoint (.ckpt) or a released folder"
        )
    if not is_released_folder(path):
        return load_model(path, dtype=dtype, preprocessing=preprocessing)
    chosen = as_preprocessing(preprocessing)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if str(config.get("model_type", "")).startswith("vlm") or any(key in config for key in RELEASED_VLM_MARKERS):
        from med3dvlm.interop import load_released_vlm

        return VisionLanguageModel(load_released_vlm(path, dtype=dtype), preprocessing=chosen)
    return _released_retrieval_model(path, config, chosen, dtype)


def _released_retrieval_model(path: Path, config: dict[str, Any], preprocessing: Preprocessing | None, dtype):
    import torch

    from med3dvlm.interop import load_released_clip
    from med3dvlm.interop.vlm import RELEASED_INPUT_SIZE_HWD
    from med3dvlm.models.text_encoder import load_tokenizer
    from med3dvlm.stages.contrastive import MAX_REPORT_TOKENS

    model, _, tokenizer_path = load_released_clip(path)
    if tokenizer_path is None:
        raise FileNotFoundError(
            f"{path} holds no tokenizer files and its config.json names no language_model_name_or_path"
        )
    height, width, depth = (int(n) for n in config.get("input_size") or RELEASED_INPUT_SIZE_HWD)
    if dtype is not None:
        model.to(dtype=getattr(torch, dtype))
    return RetrievalModel(
        model, load_tokenizer(tokenizer_path), (depth, height, width), MAX_REPORT_TOKENS, preprocessing
    )


def _file_digest(path: Path, whole: bool) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as handle:
        if whole or size <= 2 * HASHED_EDGE_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(HASHED_EDGE_BYTES))
            handle.seek(size - HASHED_EDGE_BYTES)
            digest.update(handle.read())
    return digest.hexdigest()


def model_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """``{"model": absolute path, "model_hash": sha256}`` (module docstring)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        name = file.name.lower()
        if name.endswith(WEIGHT_SUFFIXES):
            digest.update(_file_digest(file, whole=False).encode())
        elif name.endswith(CONFIG_SUFFIXES):
            digest.update(_file_digest(file, whole=True).encode())
    return {"model": str(path), "model_hash": digest.hexdigest()[:16]}
