"""One factory for the selectable 3D image encoders, and the stage-to-stage hand-off format.

An exported encoder is a folder with ``encoder.json`` (the factory arguments) and
``model.safetensors`` (the weights); ``build_encoder(pretrained=FOLDER)`` rebuilds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from med3dvlm.models.dcformer import DCFORMER_VARIANTS, DCFormer
from med3dvlm.models.folders import write_record, write_weights
from med3dvlm.models.vit3d import ViT3D

ENCODER_CONFIG_FILE = "encoder.json"
ENCODER_WEIGHTS_FILE = "model.safetensors"
# Arguments that change how an encoder runs, not what it computes: free to differ from the export.
_RUNTIME_ONLY = {"gradient_checkpointing", "dropout"}
# Speed options: how this process runs the encoder; never recorded in encoder.json (see apply_speed_options).
SPEED_OPTIONS = ("channels_last", "compile")


def build_encoder(name: str = "dcformer", pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """``name`` is ``"dcformer"`` (kwargs: variant, ...) or ``"vit3d"`` (kwargs: image_size, ...).

    Every encoder returns a list of token tensors ``(B, N_i, C_i)`` and exposes ``stage_channels``.
    ``pretrained`` is a folder written by :func:`save_pretrained_encoder` (e.g. stage 1's
    ``image_encoder/``); its saved architecture must agree with the arguments given here.
    ``channels_last`` / ``compile``: see :func:`apply_speed_options`.
    """
    speed = {key: kwargs.pop(key) for key in SPEED_OPTIONS if key in kwargs}
    if pretrained is not None:
        return apply_speed_options(load_pretrained_encoder(pretrained, expected={"name": name, **kwargs}), **speed)
    if name == "dcformer":
        encoder = DCFormer(**kwargs)
    elif name == "vit3d":
        encoder = ViT3D(**kwargs)
    else:
        variants = ", ".join(DCFORMER_VARIANTS)
        raise ValueError(f"unknown encoder {name!r}: choose 'dcformer' (variants {variants}) or 'vit3d'")
    encoder.build_config = {"name": name, **{k: _plain(v) for k, v in kwargs.items()}}
    return apply_speed_options(encoder, **speed)


def apply_speed_options(encoder: nn.Module, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Training-speed options that leave parameter names and results unchanged (measured in
    ``experiments/benchmarks/bench_train_step.py``; on a CPU neither pays for DCFormer, see README).

    ``channels_last``: the weights of 3D convolutions in ``channels_last_3d`` memory format, so they
    keep the feature maps channels-last (cuDNN / oneDNN pick their NDHWC kernels). Convolutions with
    one input channel (DCFormer's first, on the raw volume) are left as they are: on torch 2.13's CPU
    build a channels-last conv3d there corrupted the heap (crashes seen with DCFormer-small at
    32x64x64). ``compile``: ``nn.Module.compile`` in place (torch.compile of the forward; the first
    steps pay the compile time), unlike ``torch.compile(module)``, which would prefix every parameter
    name with ``_orig_mod.``.
    """
    if channels_last:
        for module in encoder.modules():
            if isinstance(module, nn.Conv3d) and module.in_channels > 1:
                module.to(memory_format=torch.channels_last_3d)
    if compile:
        encoder.compile()
    return encoder


def save_pretrained_encoder(encoder: nn.Module, output_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """``encoder.json`` (the factory arguments) + ``model.safetensors`` (``state_dict``, default the
    encoder's own), the folder ``build_encoder(pretrained=...)`` reads."""
    config = getattr(encoder, "build_config", None)
    if config is None:
        raise ValueError("this encoder was not made by build_encoder, so its architecture cannot be recorded")
    output_dir = Path(output_dir)
    write_weights(output_dir / ENCODER_WEIGHTS_FILE, state_dict if state_dict is not None else encoder.state_dict())
    write_record(output_dir / ENCODER_CONFIG_FILE, config)
    return output_dir


def load_pretrained_encoder(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / ENCODER_CONFIG_FILE, path / ENCODER_WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.exists():
            raise FileNotFoundError(
                f"{file} not found: `pretrained` must be a folder exported by stage 1 (its image_encoder/ output)"
            )
    config = json.loads(config_file.read_text())
    runtime = {}
    for key, value in (expected or {}).items():
        if key in _RUNTIME_ONLY:
            runtime[key] = value
        elif key in config and _plain(value) != config[key]:
            raise ValueError(
                f"{path}: the saved encoder has {key}={config[key]!r} but the config asks for {value!r}; "
                "make the encoder config match the export"
            )
    build_args = {k: v for k, v in config.items() if k != "name"}
    build_args.update(runtime)
    encoder = build_encoder(config["name"], **build_args)
    encoder.load_state_dict(load_file(str(weights_file)), strict=True)
    return encoder


def _plain(value: Any) -> Any:
    """OmegaConf containers and tuples -> JSON-friendly lists/dicts, for comparing configs."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
