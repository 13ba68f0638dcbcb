"""Training checkpoints (``.ckpt``) are read here, and nothing in them runs.

``torch.load(weights_only=True)`` rebuilds tensors, numbers, strings and containers only: a pickle
that asks for anything else (e.g. an object whose ``__reduce__`` calls ``os.system``) is refused
before any of it runs. The project's checkpoints need nothing more (the RNG states are stored as
plain values, see :class:`med3dvlm.stages.callbacks.RngStateCheckpoint`), so no type is allow-listed.

The run config a checkpoint stores is read as data too: rebuilding the model and its data
instantiates the ``_target_`` entries of those parts, so each must name a class or function of
med3dvlm or a torch optimizer. Which stage a checkpoint is, is told by its model's ``_target_``.

Imports only torch, Hydra and OmegaConf (when called).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Stored in every checkpoint by `python -m med3dvlm.train`, so the model can be rebuilt from it.
CONFIG_CHECKPOINT_KEY = "med3dvlm_config"
# The parts of a stored run config that loaders instantiate (export, eval, the API), and what they
# may build: the project's own classes and functions, torch's optimizers.
REBUILT_PARTS = ("model", "data")
ALLOWED_TARGET_MODULES = ("med3dvlm", "torch.optim")

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_WEIGHTS_ONLY_FAILURE = "Weights only load failed"


class CheckpointError(ValueError):
    """A file that is no checkpoint this project can read (corrupt, foreign, or unsafe)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when loaded: refused, nothing of it ran."""


def _refusal(path: str | os.PathLike, error: BaseException) -> CheckpointError:
    message = str(error)
    unsafe = _UNSUPPORTED_GLOBAL.search(message)
    if unsafe:
        return UnsafeCheckpointError(
            f"{path} was not loaded: it asks to run {unsafe.group(1)}, and med3dvlm loads only tensors and plain "
            "values (torch.load weights_only=True); a checkpoint of `python -m med3dvlm.train` never asks that, "
            "so this file comes from elsewhere or was changed"
        )
    detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
    detail_line = detail[0].strip() if detail else type(error).__name__
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint (weights-only unpickler: {detail_line})")


@contextmanager
def refusing_unsafe_pickles(path: str | os.PathLike | None) -> Iterator[None]:
    """Turns torch's weights-only refusal inside the block (e.g. Lightning resuming from ``path``)
    into an error that names ``path``: :class:`UnsafeCheckpointError` when the file asks to run a
    function, :class:`CheckpointError` when it is no checkpoint at all."""
    try:
        yield
    except pickle.UnpicklingError as error:
        if path is None or _WEIGHTS_ONLY_FAILURE not in str(error):
            raise
        raise _refusal(path, error) from error


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` on the CPU, read with ``weights_only=True``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with refusing_unsafe_pickles(path):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})"
            ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict)")
    return checkpoint


def stored_run_config(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The run config ``python -m med3dvlm.train`` stored in ``checkpoint``, checked so that
    instantiating it can only build the project's own objects."""
    config = checkpoint.get(CONFIG_CHECKPOINT_KEY)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no med3dvlm run config: was it written by `python -m med3dvlm.train`?")
    rebuilt = {part: config[part] for part in REBUILT_PARTS if part in config}
    for where, target in _targets(rebuilt):
        if not _allowed_target(target):
            allowed = " or ".join(f"{module}.*" for module in ALLOWED_TARGET_MODULES)
            raise UnsafeCheckpointError(
                f"{path} was not loaded: its run config asks to build {target!r} ({where}._target_), and a "
                f"checkpoint's config may only build {allowed}; this file comes from elsewhere or was changed"
            )
    return config


def _targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                yield where, value
            else:
                yield from _targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _targets(value, f"{where}[{index}]")


def _within(module: str) -> bool:
    return any(module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED_TARGET_MODULES)


def _allowed_target(target: Any) -> bool:
    """Named under an allowed package and defined there: ``med3dvlm.train.os.system`` is os.system."""
    from hydra.utils import get_object

    if not isinstance(target, str) or not _within(target):
        return False
    try:
        found = get_object(target)  # imports only modules under the allowed packages
    except Exception:  # noqa: BLE001 - a target that cannot be found cannot be built either
        return False
    return callable(found) and _within(getattr(found, "__module__", None) or "")


def read_checkpoint(ckpt_path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(run config, checkpoint)`` of a checkpoint written by ``python -m med3dvlm.train``, read
    without running anything in it; the run config as an OmegaConf node."""
    from omegaconf import OmegaConf

    from med3dvlm.resolvers import register_resolvers

    register_resolvers()
    checkpoint = load_checkpoint(ckpt_path)
    return OmegaConf.create(stored_run_config(checkpoint, ckpt_path)), checkpoint


# The LightningModule of each stage, as a run config names it, and the stage it trains.
VLM_STAGE_TARGET = "med3dvlm.stages.vlm.VLMStage"
CONTRASTIVE_STAGE_TARGET = "med3dvlm.stages.contrastive.ContrastiveModule"
STAGE_OF_TARGET = {VLM_STAGE_TARGET: "vlm", CONTRASTIVE_STAGE_TARGET: "contrastive"}


def checkpoint_stage(cfg: Any) -> str:
    """``"vlm"`` or ``"contrastive"``: which stage's LightningModule a run config builds."""
    target = cfg.model.get("_target_")
    if target not in STAGE_OF_TARGET:
        raise ValueError(f"a checkpoint of {target} is none of med3dvlm's stages: expected a stage-1 or stage-2/3 run")
    return STAGE_OF_TARGET[target]
