"""Evaluation entry point: ``python -m med3dvlm.eval eval=<suite> ckpt_path=...``.

A training checkpoint records the resolved run config, so the model and its data are rebuilt from
the checkpoint alone; ``data_root=`` points the evaluation at another dataset in the same layout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from med3dvlm.resolvers import register_resolvers

log = logging.getLogger(__name__)
register_resolvers()


def load_run_config(ckpt_path: str) -> tuple[DictConfig, dict[str, Any]]:
    import torch

    from med3dvlm.train import CONFIG_CHECKPOINT_KEY

    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if CONFIG_CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path} holds no med3dvlm run config: was it written by `python -m med3dvlm.train`?")
    return OmegaConf.create(checkpoint[CONFIG_CHECKPOINT_KEY]), checkpoint


def evaluate_retrieval(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L

    from med3dvlm.stages.callbacks import write_json

    run_cfg, checkpoint = load_run_config(cfg.ckpt_path)
    with open_dict(run_cfg):
        if cfg.get("data_root"):
            run_cfg.data.datamodule.root = cfg.data_root
        if cfg.get("batch_size"):
            run_cfg.data.datamodule.batch_size = cfg.batch_size
        run_cfg.model.retrieval_sizes = list(cfg.eval.sizes)
        run_cfg.model.retrieval_ks = list(cfg.eval.ks)
    L.seed_everything(cfg.seed)
    module = hydra.utils.instantiate(run_cfg.model)
    module.load_state_dict(checkpoint["state_dict"])
    datamodule = hydra.utils.instantiate(run_cfg.data.datamodule)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False)
    trainer.test(module, datamodule=datamodule)
    report = module.test_report()
    out = Path(cfg.paths.output_dir) / report["file"]
    write_json(out, {"ckpt_path": str(cfg.ckpt_path), "results": report["results"]})
    print(report["table"])
    log.info("retrieval results written to %s", out)
    return report["results"]


SUITES = {"retrieval": evaluate_retrieval}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    name = cfg.eval.name
    if name not in SUITES:
        raise ValueError(f"unknown eval suite {name!r}; available: {', '.join(SUITES)}")
    return SUITES[name](cfg)


@hydra.main(version_base="1.3", config_path="pkg://med3dvlm.configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
