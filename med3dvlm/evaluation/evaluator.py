"""The evaluator behind ``python -m med3dvlm.eval eval=<suite> ...``: one function per suite.

A training checkpoint records the resolved run config, so the model and its data are rebuilt from
the checkpoint alone; ``data_root=`` points the evaluation at another dataset in the same layout.
``eval=retrieval released_clip_dir=DIR data_root=ROOT`` evaluates a released DCFormer_SigLIP folder.
``eval=caption|vqa_closed|vqa_open|all model_dir=DIR data_root=ROOT`` generates with an exported VLM
and scores with the SPEC §7 metrics; ``eval=score predictions=PATH`` scores an existing file.
``eval=zero_shot ckpt_path=PATH|model_dir=DIR [data_root=ROOT]`` classifies CT-RATE's abnormalities
with a stage-1 model (CT-CLIP's protocol).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def evaluate_retrieval(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L

    if cfg.get("released_clip_dir"):
        return evaluate_released_retrieval(cfg)
    from med3dvlm.checkpoints import read_checkpoint, rebuild_stage

    run_cfg, checkpoint = read_checkpoint(cfg.ckpt_path)
    with open_dict(run_cfg):
        if cfg.get("data_root"):
            run_cfg.data.datamodule.root = cfg.data_root
        if cfg.get("batch_size"):
            run_cfg.data.datamodule.batch_size = cfg.batch_size
        run_cfg.model.retrieval_sizes = list(cfg.eval.sizes)
        run_cfg.model.retrieval_ks = list(cfg.eval.ks)
    L.seed_everything(cfg.seed)
    module = rebuild_stage(run_cfg, checkpoint)
    datamodule = hydra.utils.instantiate(run_cfg.data.datamodule)
    return _test_retrieval(cfg, module, datamodule, {"ckpt_path": str(cfg.ckpt_path)})


# Volumes per batch when evaluating a released folder without batch_size=.
RELEASED_EVAL_BATCH_SIZE = 8


def evaluate_released_retrieval(cfg: DictConfig) -> dict[str, Any]:
    """``released_clip_dir=DIR data_root=ROOT``: the released DCFormer_SigLIP model (SPEC §8) on the
    M3D-Cap test split under ``data_root``, whose volumes are prepared as the model expects (SPEC §6)."""
    import lightning as L

    from med3dvlm.data import M3DCapDataModule
    from med3dvlm.interop import load_released_clip
    from med3dvlm.stages.contrastive import MAX_REPORT_TOKENS, ContrastiveCollator, ContrastiveModule

    if not cfg.get("data_root"):
        raise ValueError("released_clip_dir= needs data_root=DIR, a data root in the M3D-Cap layout (see the README)")
    model, loss, tokenizer_path = load_released_clip(cfg.released_clip_dir)
    if tokenizer_path is None:
        raise ValueError(
            f"{cfg.released_clip_dir} holds no tokenizer files and its config.json names no language_model_name_or_path"
        )
    L.seed_everything(cfg.seed)
    module = ContrastiveModule(model, loss, retrieval_sizes=list(cfg.eval.sizes), retrieval_ks=list(cfg.eval.ks))
    collator = ContrastiveCollator(tokenizer_path, max_length=MAX_REPORT_TOKENS, train=False)
    batch_size = cfg.get("batch_size") or RELEASED_EVAL_BATCH_SIZE
    datamodule = M3DCapDataModule(cfg.data_root, batch_size=batch_size, collate_fn=collator)
    return _test_retrieval(cfg, module, datamodule, {"released_clip_dir": str(cfg.released_clip_dir)})


def _test_retrieval(cfg: DictConfig, module, datamodule, source: dict[str, str]) -> dict[str, Any]:
    """Runs the retrieval protocol (the module's test step), writes the JSON, prints the table."""
    import lightning as L

    from med3dvlm.utils import json_bytes, write_atomic

    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False)
    trainer.test(module, datamodule=datamodule)
    report = module.test_report()
    out = Path(cfg.paths.output_dir) / report["file"]
    write_atomic(out, json_bytes({**source, "results": report["results"]}))
    print(report["table"])
    log.info("retrieval results written to %s", out)
    return report["results"]


def text_metrics_from_config(metrics_cfg: DictConfig):
    """The SPEC §7 text metrics as configured in ``configs/eval/text_metrics``."""
    import torch

    from med3dvlm.metrics.text import BertScoreSettings, TextMetrics

    bertscore = None
    if metrics_cfg.bertscore.model:
        settings = OmegaConf.to_container(metrics_cfg.bertscore, resolve=True)
        if settings["device"] == "auto":
            settings["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        bertscore = BertScoreSettings(**settings)
    return TextMetrics(
        bertscore=bertscore,
        tokenizer=metrics_cfg.tokenizer,
        wordnet=metrics_cfg.wordnet,
        nltk_data_dir=metrics_cfg.nltk_data_dir,
    )


def evaluate_score(cfg: DictConfig) -> dict[str, Any]:
    """``eval=score predictions=PATH``: score an existing predictions file, ours or another system's."""
    from med3dvlm.evaluation.scoring import format_summary_table, score_file

    if not cfg.get("predictions"):
        raise ValueError(
            "eval=score needs the predictions file: predictions=PATH (JSONL, one object per sample "
            "with prediction and reference; VQA rows add question_type, closed ones answer_choice)"
        )
    summary = score_file(
        cfg.predictions,
        cfg.paths.output_dir,
        task=cfg.eval.task,
        make_metrics=lambda: text_metrics_from_config(cfg.eval.text_metrics),
    )
    print(format_summary_table(summary))
    log.info("scores written to %s", cfg.paths.output_dir)
    return summary


def _device(accelerator: str) -> str:
    import torch

    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else accelerator


def evaluate_generation(cfg: DictConfig) -> dict[str, Any]:
    """``eval=caption|vqa_closed|vqa_open|all model_dir=DIR data_root=DIR``: generate with the VLM
    (resuming in the same run folder), score as SPEC §7; ``all`` adds retrieval given ``ckpt_path``."""
    from med3dvlm.evaluation.generate import evaluate_tasks, plans_from_config

    with_retrieval = cfg.eval.name == "all" and bool(
        cfg.get("released_clip_dir") or not OmegaConf.is_missing(cfg, "ckpt_path")
    )
    if with_retrieval and not cfg.get("released_clip_dir") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {cfg.ckpt_path} does not exist (ckpt_path= of eval=all, for retrieval)")
    summaries: dict[str, Any] = evaluate_tasks(
        plans_from_config(OmegaConf.to_container(cfg.eval, resolve=False)),
        cfg.model_dir,
        cfg.data_root,
        cfg.paths.output_dir,
        make_metrics=lambda: text_metrics_from_config(cfg.eval.text_metrics),
        dtype=cfg.dtype,
        device=_device(cfg.accelerator),
        seed=cfg.seed,
        seeds=list(cfg.seeds) if cfg.get("seeds") is not None else None,
    )
    if with_retrieval:
        summaries["retrieval"] = evaluate_retrieval(cfg)
    elif cfg.eval.name == "all":
        log.info("retrieval skipped: give ckpt_path= (a stage-1 checkpoint) or released_clip_dir= to include it")
    return summaries


def evaluate_zero_shot(cfg: DictConfig) -> dict[str, Any]:
    """``eval=zero_shot ckpt_path=STAGE1_CKPT [data_root=DIR]`` or ``model_dir=STAGE1_EXPORT data_root=DIR``:
    CT-CLIP's zero-shot abnormality classification (:mod:`med3dvlm.evaluation.zero_shot`) on the CT-RATE
    labels of ``eval.split``; the checkpoint's own data root unless ``data_root=`` is given."""
    from med3dvlm.api import load_model
    from med3dvlm.checkpoints import checkpoint_stage, read_checkpoint
    from med3dvlm.data.ct_rate import ABNORMALITY_LABELS
    from med3dvlm.evaluation.zero_shot import run_zero_shot

    model_dir = cfg.get("model_dir")
    ckpt_path = None if OmegaConf.is_missing(cfg, "ckpt_path") else cfg.get("ckpt_path")
    if bool(model_dir) == bool(ckpt_path):
        raise ValueError(
            "eval=zero_shot takes one stage-1 (SigLIP/CLIP) model: ckpt_path=<stage-1 checkpoint> or "
            f"model_dir=<stage-1 export folder>{', not both' if model_dir else ''}"
        )
    data_root = cfg.get("data_root")
    if ckpt_path:
        run_cfg, _ = read_checkpoint(ckpt_path)
        if checkpoint_stage(run_cfg) != "contrastive":
            raise ValueError(
                f"{ckpt_path} is a stage-2/3 (VLM) checkpoint; eval=zero_shot needs a stage-1 (SigLIP/CLIP) one"
            )
        data_root = data_root or run_cfg.data.datamodule.get("root")
        source = {"ckpt_path": str(ckpt_path)}
    else:
        source = {"model_dir": str(model_dir)}
    if not data_root:
        raise ValueError(
            "eval=zero_shot needs data_root=DIR: a root prepared by `python -m med3dvlm.prepare source=ct_rate`"
        )
    model = load_model(ckpt_path or model_dir, device=_device(cfg.accelerator), dtype=cfg.dtype)
    if model.kind != "retrieval":
        raise ValueError(
            f"{model_dir} is a VLM (stages 2-3); eval=zero_shot needs a stage-1 (SigLIP/CLIP) export folder"
        )
    settings = cfg.eval
    return run_zero_shot(
        model,
        data_root,
        cfg.paths.output_dir,
        split=settings.split,
        labels=list(settings.labels) if settings.get("labels") is not None else ABNORMALITY_LABELS,
        limit=settings.get("limit"),
        batch_size=cfg.get("batch_size") or settings.batch_size,
        num_workers=settings.num_workers,
        logit_scale=settings.logit_scale,
        threshold=settings.threshold,
        templates=(settings.positive_prompt, settings.negative_prompt),
        source=source,
    )


SUITES = {
    "retrieval": evaluate_retrieval,
    "score": evaluate_score,
    "caption": evaluate_generation,
    "vqa_closed": evaluate_generation,
    "vqa_open": evaluate_generation,
    "all": evaluate_generation,
    "zero_shot": evaluate_zero_shot,
}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    name = cfg.eval.name
    if name not in SUITES:
        raise ValueError(f"unknown eval suite {name!r}; available: {', '.join(SUITES)}")
    if cfg.get("seeds") is not None and SUITES[name] is not evaluate_generation:
        raise ValueError(
            f"seeds=[...] repeats sampled generation (eval=caption|vqa_closed|vqa_open|all), not eval={name}"
        )
    return SUITES[name](cfg)
