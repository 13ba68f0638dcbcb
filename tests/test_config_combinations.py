"""Every ``debug`` x ``data`` x ``experiment`` combination composes into a config that starts a run
(what ``train`` reads before building anything), or is refused with a message naming the data to use."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra_helpers import compose_config
from omegaconf import OmegaConf

from med3dvlm import train as train_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONTRASTIVE = "med3dvlm.stages.contrastive.ContrastiveModule"
PAIRS = "med3dvlm.data.M3DCapDataModule"  # image-report pairs: what stage 1 reads
MIXTURE = "med3dvlm.data.MixtureDataModule"  # a task mixture: what stages 2-3 read
TINY_PHANTOM = {"num_cases": 24, "shape": [16, 32, 32]}  # debug=tiny's phantom set


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> dict[str, bool]:
    """``{data config: whether it generates a phantom set}``, composed without any debug config."""
    tmp = tmp_path_factory.mktemp("data_kinds")
    return {name: compose_config("train", [f"data={name}"], tmp).data.phantom is not None for name in choices("data")}


def test_every_data_config_builds_a_known_datamodule(tmp_path):
    for name in choices("data"):
        assert compose_config("train", [f"data={name}"], tmp_path).data.datamodule._target_ in (PAIRS, MIXTURE), name
    assert set(choices("debug")) == {"fdr", "tiny"}


@pytest.mark.parametrize("debug", [None, *choices("debug")])
@pytest.mark.parametrize("data", choices("data"))
@pytest.mark.parametrize("experiment", choices("experiment"))
def test_combination_composes_and_starts(experiment, data, debug, phantom_data, tmp_path, monkeypatch):
    overrides = [f"experiment={experiment}", f"data={data}", *([f"debug={debug}"] if debug else [])]
    cfg = compose_config("train", overrides, tmp_path)
    stage_1 = cfg.model._target_ == CONTRASTIVE
    if stage_1 != (cfg.data.datamodule._target_ == PAIRS):
        expected = "data=phantom_cap or data=m3d_cap" if stage_1 else "data=phantom_vqa or data=m3d_vqa"
        with pytest.raises(ValueError, match=rf"use .*\(e\.g\. {expected}\)"):
            train_module.check_stage_data(cfg)
        return
    train_module.check_stage_data(cfg)
    run_config = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    OmegaConf.to_container(run_config, resolve=True)  # every interpolation resolves

    generated = []  # what train.prepare_data asks the phantom generator for (nothing is written)
    monkeypatch.setattr(
        "med3dvlm.data.phantoms.ensure_phantom_dataset", lambda root, **kw: generated.append((root, kw))
    )
    train_module.prepare_data(cfg)
    if not phantom_data[data]:  # the user's data, read as it is, whatever debug config
        assert cfg.data.phantom is None and not generated
        assert cfg.data.datamodule.root == cfg.paths.data_dir
        return
    ((root, kwargs),) = generated
    assert root == cfg.data.datamodule.root
    assert set(kwargs) == {"num_cases", "shape", "seed"}
    if debug == "tiny":
        assert {"num_cases": kwargs["num_cases"], "shape": list(kwargs["shape"])} == TINY_PHANTOM
        assert root.endswith("phantoms_16x32x32_n24")


def test_debug_tiny_limits_the_batches_of_real_data_too(tmp_path):
    cfg = compose_config("train", ["experiment=siglip", "data=m3d_cap", "debug=tiny"], tmp_path)
    assert cfg.data.datamodule.batch_size == 4 and cfg.trainer.limit_train_batches == 2
    assert cfg.data.datamodule.spatial_size == [128, 256, 256]  # the real data's size
