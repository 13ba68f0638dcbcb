"""Tiny exported models and phantom volumes for the API, demo, app and README tests (seconds to build).

The models are the shipped configs (``experiment=siglip`` / ``experiment=finetune`` with
``debug=tiny``) shrunk to the smallest sizes the other tests use, with random weights: what the tests
check is that every path gives the same numbers as the model itself, not what the model says.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra_helpers import CPU_TINY, compose_config, small_llm
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_LLM = small_llm(layers=1)
PHANTOM_SHAPE = (16, 32, 32)  # debug=tiny's phantom shape: the models' image_size
PHANTOM_CASES = 6


@dataclass(frozen=True)
class TinyModels:
    vlm_dir: Path  # Med3DVLM.save_pretrained folder
    clip_checkpoint: Path  # a stage-1 checkpoint as python -m med3dvlm.train writes it
    clip_dir: Path  # its export (python -m med3dvlm.export)
    volumes: list[Path]  # phantom volumes, .nii.gz, PHANTOM_SHAPE
    reports: list[str]  # their reports
    data_root: Path  # the phantom dataset they come from (M3D layout)


def phantom_volumes(root: Path) -> tuple[list[Path], list[str]]:
    from med3dvlm.data import make_phantom_dataset

    make_phantom_dataset(root, num_cases=PHANTOM_CASES, shape=PHANTOM_SHAPE, seed=0)
    cap = json.loads((root / "M3D_Cap.json").read_text())
    entries = [entry for split in ("train", "validation", "test") for entry in cap[split]]
    return [root / e["image"] for e in entries], [(root / e["text"]).read_text().strip() for e in entries]


def write_clip_checkpoint(tmp_path: Path) -> Path:
    """A stage-1 checkpoint with the run config stored as ``train.py`` stores it, without training:
    random weights with the heads perturbed so that the export must carry them."""
    from med3dvlm.checkpoints import CONFIG_CHECKPOINT_KEY

    cfg = compose_config("train", ["experiment=siglip", "debug=tiny", *CPU_TINY], tmp_path)
    record_phantom_preprocessing(cfg)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    with torch.no_grad():
        module.model.text_projection.bias.add_(0.5)
        module.model.image_encoder.stages[0].convs[0].branches[0].norm.running_mean.add_(0.1)
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    path = tmp_path / "siglip_run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), CONFIG_CHECKPOINT_KEY: resolved}, path)
    return path


def record_phantom_preprocessing(cfg) -> None:
    """``data.preprocessing`` as ``train`` records it from a phantom root (the models are built without training)."""
    from omegaconf import open_dict

    from med3dvlm.data.phantoms import phantom_preprocessing

    with open_dict(cfg):
        cfg.data.preprocessing = phantom_preprocessing(PHANTOM_SHAPE).to_dict()


def write_vlm(tmp_path: Path) -> Path:
    """A VLM folder as ``export`` writes it: weights, config and the phantoms' preprocessing record."""
    from med3dvlm.data.phantoms import phantom_preprocessing
    from med3dvlm.data.preprocessing import write_preprocessing

    cfg = compose_config("train", ["experiment=finetune", "debug=tiny", *CPU_TINY, *SMALL_LLM], tmp_path)
    torch.manual_seed(0)
    vlm = hydra.utils.instantiate(cfg.model.model).eval()
    folder = vlm.save_pretrained(tmp_path / "vlm")
    write_preprocessing(folder, phantom_preprocessing(PHANTOM_SHAPE))
    return folder


def build_tiny_models(tmp_path: Path) -> TinyModels:
    from med3dvlm.checkpoints.export import export_checkpoint

    volumes, reports = phantom_volumes(tmp_path / "phantoms")
    checkpoint = write_clip_checkpoint(tmp_path / "clip_work")
    _, clip_dir = export_checkpoint(checkpoint, tmp_path / "siglip")
    vlm_dir = write_vlm(tmp_path / "vlm_work")
    return TinyModels(vlm_dir, checkpoint, clip_dir, volumes, reports, tmp_path / "phantoms")


def load_experiment_script(name: str):
    """``experiments/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
