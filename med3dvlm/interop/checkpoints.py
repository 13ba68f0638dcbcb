"""Reading released checkpoint directories: ``config.json`` plus weights in the Hugging Face layout.

Weights are read from, in this order: ``model.safetensors.index.json`` (sharded safetensors),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded ``.bin``), ``pytorch_model.bin``.
``.bin`` files are read with ``torch.load(weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from med3dvlm.interop.naming import ReleasedCheckpointError

CONFIG_FILE = "config.json"
# (index file, single file) pairs in order of preference.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: give the released checkpoint's folder")
    config_file = directory / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(
            f"{config_file} not found: a released checkpoint folder holds config.json and its weights"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ReleasedCheckpointError(f"{config_file} is not valid JSON: {error}") from error


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder (several when sharded)."""
    directory = Path(directory)
    for index_name, single_name in WEIGHT_LAYOUTS:
        index = directory / index_name
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ReleasedCheckpointError(f"{index} has no 'weight_map' naming the shards")
            shards = [directory / shard for shard in sorted(set(weight_map.values()))]
            absent = [str(shard) for shard in shards if not shard.exists()]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(absent)}")
            return shards
        if (directory / single_name).exists():
            return [directory / single_name]
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    expected = ", ".join(name for pair in WEIGHT_LAYOUTS for name in pair)
    raise FileNotFoundError(f"{directory} holds no weights (one of {expected}); it holds {found}")


def read_weights(files: list[Path] | Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` (or those whose name ``keep`` accepts), on the CPU.

    safetensors files are read tensor by tensor, so ``keep`` avoids loading what is not needed
    (the encoder alone out of a 7B checkpoint).
    """
    files = [files] if isinstance(files, Path) else files
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    if keep is None or keep(name):
                        state_dict[name] = handle.get_tensor(name)
        elif file.suffix == ".bin":
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise ReleasedCheckpointError(f"{file} holds a {type(loaded).__name__}, not a state dict")
            state_dict.update({k: v for k, v in loaded.items() if keep is None or keep(k)})
        else:
            raise ReleasedCheckpointError(f"{file}: weights must be .safetensors or .bin files")
    return state_dict
