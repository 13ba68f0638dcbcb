"""Stage 1 end to end on tiny phantoms: configs, fast_dev_run, hand-off, eval app, resume, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config
from omegaconf import open_dict

from med3dvlm.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
TINY = ["debug=tiny", *CPU_TINY]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_config(tmp_path: Path, *overrides: str):
    return compose_config("train", ["experiment=siglip", *TINY, *overrides], tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", "trainer.accelerator=cpu"], tmp_path)
    assert cfg.model._target_
    # hub models are replaced by the offline ones: this checks the wiring, not the download
    with open_dict(cfg):
        cfg.text_encoder.name_or_path = compose_config("train", [], tmp_path).text_encoder.name_or_path
        if cfg.get("llm") and cfg.llm.config is None:  # stages 2-3: a hub/GGUF LLM -> the offline tiny one
            cfg.llm = compose_config("train", ["experiment=pretrain", "llm=tiny"], tmp_path).llm
        cfg.trainer.strategy = "auto"
        cfg.trainer.precision = "32-true"
        cfg.trainer.devices = 1
    module = hydra.utils.instantiate(cfg.model)
    assert sum(p.numel() for p in module.parameters()) > 0
    datamodule = hydra.utils.instantiate(cfg.data.datamodule)
    assert datamodule.batch_size == cfg.data.datamodule.batch_size
    hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "deepspeed", "deepspeed_zero3"])
def test_every_strategy_composes_and_instantiates(strategy, tmp_path):
    cfg = compose_config("train", [f"strategy={strategy}"], tmp_path)
    node = cfg.trainer.strategy
    if strategy == "single":
        assert node == "auto"
        return
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    instance = hydra.utils.instantiate(node)
    expected = {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy"}.get(strategy, "DeepSpeedStrategy")
    assert type(instance).__name__ == expected
    if strategy.startswith("deepspeed"):
        assert instance.config["zero_optimization"]["stage"] == (3 if "zero3" in strategy else 2)


@pytest.mark.parametrize("logger", ["csv", "wandb", "tensorboard", "many"])
def test_loggers_work_offline(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [f"logger={logger}"], tmp_path)
    loggers = [hydra.utils.instantiate(entry) for entry in cfg.logger.values()]
    assert loggers
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True


def test_slurm_launcher_and_sweep_compose(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config("train", ["launcher=slurm", "hparams_search=siglip_loss_lr"], tmp_path)
    assert "submitit" in cfg.hydra.launcher._target_
    assert cfg.hydra.sweeper.params["loss"] == "siglip,clip"


def test_fast_dev_run(tmp_path):
    # debug=fdr replaces debug=tiny, and with it the tiny phantom set (configs/debug_data): keep it, so
    # the run does not first generate the default 640 phantoms
    cfg = tiny_config(tmp_path, "debug=fdr", "data.phantom.num_cases=24", "data.phantom.shape=[16,32,32]",
                      "data.datamodule.batch_size=4")  # fmt: skip
    train(cfg)


def test_tiny_run_trains_tests_and_hands_off_the_encoder(tmp_path, capsys):
    from med3dvlm.evaluation.evaluator import evaluate
    from med3dvlm.models import build_encoder

    cfg = tiny_config(tmp_path, "callbacks.model_checkpoint.monitor=null")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    results = json.loads((run / "retrieval.json").read_text())
    assert results and all("i2t_R@1" in row for row in results.values())
    assert "image->text R@1" in capsys.readouterr().out
    assert any(key.startswith("test/") for key in metrics)

    # hand-off: the exported encoder rebuilds and equals the trained checkpoint's weights
    encoder = build_encoder(name="dcformer", variant="nano", pretrained=str(run / "image_encoder"))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, last["state_dict"][f"model.image_encoder.{name}"]), name
    with pytest.raises(ValueError, match="variant"):
        build_encoder(name="dcformer", variant="small", pretrained=str(run / "image_encoder"))

    # the data root's preprocessing record travels in the checkpoint and into the export
    from med3dvlm.checkpoints import CONFIG_CHECKPOINT_KEY
    from med3dvlm.checkpoints.export import export_checkpoint
    from med3dvlm.data.phantoms import phantom_preprocessing
    from med3dvlm.data.preprocessing import read_preprocessing

    phantoms = phantom_preprocessing(cfg.data.phantom.shape)
    assert last[CONFIG_CHECKPOINT_KEY]["data"]["preprocessing"] == phantoms.to_dict()
    _, exported = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert read_preprocessing(exported) == phantoms

    # the eval app rebuilds model and data from the checkpoint alone
    eval_cfg = compose_config(
        "eval", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "accelerator=cpu"], tmp_path / "eval"
    )
    eval_results = evaluate(eval_cfg)
    assert json.loads((Path(eval_cfg.paths.output_dir) / "retrieval.json").read_text())["results"]
    assert set(eval_results) == {int(k) for k in results}


def test_nan_loss_stops_the_run_with_a_clear_message(tmp_path):
    cfg = tiny_config(tmp_path, "loss.init_logit_bias=nan")
    with pytest.raises(RuntimeError, match="NaN"):
        train(cfg)


@pytest.mark.slow
def test_hydra_multirun_runs_two_jobs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "med3dvlm.train",
        "-m",
        "experiment=siglip",
        *TINY,
        "train=true",
        "test=false",
        "seed=1,2",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "hydra.sweep.dir=" + str(tmp_path / "sweep"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    """strategy=ddp with gloo: two processes train and test; rank 0 writes the results."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "med3dvlm.train",
        "experiment=siglip",
        *TINY,
        "strategy=ddp",
        "trainer.devices=2",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # Lightning's own messages: both ranks joined the gloo group, not one process on its own
    assert "Starting with 2 processes" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    assert output.count("image encoder saved to") == 1  # one writer of the hand-off
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert json.loads((run_dir / "retrieval.json").read_text())
