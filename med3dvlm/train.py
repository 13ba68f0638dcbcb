"""Training entry point: ``python -m med3dvlm.train [experiment=siglip] [key=value ...]``.

Composes ``configs/train.yaml`` with Hydra, builds the DataModule, the stage's LightningModule,
callbacks and loggers, then fits and (``test=true``) evaluates the best checkpoint. Outputs go to the
Hydra run dir (``hydra.run.dir=...`` or ``paths.log_dir=...`` move them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from med3dvlm.checkpoints import CONFIG_CHECKPOINT_KEY, refusing_unsafe_pickles
from med3dvlm.cli import hydra_command
from med3dvlm.resolvers import register_resolvers

log = logging.getLogger(__name__)
PROGRAM = "med3dvlm.train"

register_resolvers()


# The DataModule each stage reads, and data configs that give it.
STAGE_DATA = {
    "med3dvlm.stages.contrastive.ContrastiveModule": (
        "med3dvlm.data.M3DCapDataModule",
        "image-report pairs (e.g. data=phantom_cap or data=m3d_cap)",
    ),
    "med3dvlm.stages.vlm.VLMStage": (
        "med3dvlm.data.MixtureDataModule",
        "a task mixture (e.g. data=phantom_vqa or data=m3d_vqa)",
    ),
}


def check_stage_data(cfg: DictConfig) -> None:
    """Stage 1 learns from image-report pairs, stages 2-3 from a task mixture: a data config of the
    other kind is refused before anything is built (a DataModule of the user's own passes)."""
    stage = cfg.model.get("_target_")
    datamodule = cfg.data.datamodule.get("_target_")
    known = {target for target, _ in STAGE_DATA.values()}
    if stage in STAGE_DATA and datamodule in known and datamodule != STAGE_DATA[stage][0]:
        expected, configs = STAGE_DATA[stage]
        raise ValueError(f"model {stage} reads a {expected}, but the data config builds a {datamodule}: use {configs}")


def prepare_data(cfg: DictConfig) -> None:
    """Generate the phantom dataset once when the data config asks for it."""
    phantom = cfg.data.get("phantom")
    if not phantom:
        return
    from med3dvlm.data.phantoms import ensure_phantom_dataset

    root = cfg.data.datamodule.root
    ensure_phantom_dataset(root, num_cases=phantom.num_cases, shape=tuple(phantom.shape), seed=phantom.seed)
    volume_format = cfg.data.datamodule.get("volume_format")
    if volume_format and volume_format != "nii.gz":
        from med3dvlm.data.prepare import convert_dataset

        # the fast copies; existing ones are kept, so this is cheap after the first run
        convert_dataset(root, formats=("nii.gz", volume_format), progress=False)


def record_data_preprocessing(cfg: DictConfig) -> None:
    """``cfg.data.preprocessing``: the data root's record of how raw CT became its volumes
    (``preprocessing.json``, written by ``prepare`` and the phantom generator), or null. It travels in
    every checkpoint and export, so inference applies it to raw input."""
    from omegaconf import open_dict

    from med3dvlm.data.preprocessing import read_preprocessing

    if cfg.data.get("preprocessing") is not None:
        return  # set by the user (e.g. data prepared by other tools)
    root = cfg.data.datamodule.get("root")
    record = read_preprocessing(root) if root else None
    with open_dict(cfg):
        cfg.data.preprocessing = None if record is None else record.to_dict()
    if record is None:
        log.warning(
            "%s records no preprocessing (preprocessing.json): the trained model will accept only prepared "
            "volumes in [0, 1], not raw CT; set data.preprocessing or prepare the data with python -m med3dvlm.prepare",
            root,
        )


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); skip nulls."""
    if not group:
        return []
    return [hydra.utils.instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(
                f"ckpt_path=last but {last} does not exist; to resume a run, point hydra.run.dir at that run's folder"
            )
        return str(last)
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]):
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def train(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fit, then test; returns the metrics (used by Hydra sweeps and tests)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from med3dvlm.utils import json_bytes, write_atomic

    check_stage_data(cfg)
    output_dir = cfg.paths.output_dir
    # a missing checkpoint is reported before anything is built
    resume_from = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir) if cfg.get("train", True) else None
    L.seed_everything(cfg.seed, workers=True)
    prepare_data(cfg)
    record_data_preprocessing(cfg)

    log.info("building datamodule <%s>", cfg.data.datamodule._target_)
    datamodule = hydra.utils.instantiate(cfg.data.datamodule)
    log.info("building model <%s>", cfg.model._target_)
    module = hydra.utils.instantiate(cfg.model)

    # the run's own config (without Hydra's node, which only resolves inside a Hydra job)
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)

    class StoreConfig(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint[CONFIG_CHECKPOINT_KEY] = resolved

    callbacks = instantiate_group(cfg.get("callbacks")) + [StoreConfig(), *(extra_callbacks or [])]
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)

    metrics: dict[str, Any] = {}
    if cfg.get("train", True):
        # Lightning reads the checkpoint with torch.load(weights_only=True): nothing in it runs
        with refusing_unsafe_pickles(resume_from):
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best if best and not cfg.trainer.get("fast_dev_run") else None
        if ckpt is None:
            log.warning("no best checkpoint: testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        report = getattr(module, "test_report", None)
        if callable(report) and trainer.is_global_zero:
            summary = report()
            write_atomic(Path(output_dir) / summary["file"], json_bytes(summary["results"]))
            print(summary["table"])
            log.info("test results written to %s", Path(output_dir) / summary["file"])
    return metrics


@hydra_command(PROGRAM, "train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    monitor = cfg.get("monitor")
    if monitor and monitor.get("metric") in metrics:
        return metrics[monitor.metric]  # the value Hydra sweepers optimise
    return None


if __name__ == "__main__":
    raise SystemExit(main())
