"""One ``predict`` run: inputs and questions read, the model loaded, Lightning's predict loop over
every rank, the shards merged into ``out`` and the summary printed (see :mod:`med3dvlm.predicting`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from med3dvlm.api import Model
from med3dvlm.evaluation.generate import GenerationSettings
from med3dvlm.predicting.data import PredictionDataModule
from med3dvlm.predicting.inputs import REPORT_QUESTION, InputSpecError, Question, build_questions, find_inputs
from med3dvlm.predicting.models import load_predict_model, model_fingerprint
from med3dvlm.predicting.module import BatchPredictor, ShardWriter, VolumeProgress
from med3dvlm.predicting.outputs import TASKS, PredictionOutput, RunSummary, row_id
from med3dvlm.utils import available_cores

log = logging.getLogger(__name__)


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 of the run, from what launchers put in the environment
    (torchrun's RANK, Lightning's LOCAL_RANK / NODE_RANK, SLURM's SLURM_PROCID); before any Trainer exists."""
    if os.environ.get("RANK") is not None:
        return int(os.environ["RANK"]) == 0
    if os.environ.get("LOCAL_RANK") is not None:
        return int(os.environ["LOCAL_RANK"]) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0
    return int(os.environ.get("SLURM_PROCID") or 0) == 0


def run_questions(cfg: DictConfig) -> list[Question]:
    """The question(s) every input is asked: the report prompt, the user's questions, or none."""
    if cfg.task not in TASKS:
        raise InputSpecError(f"task={cfg.task}: expected one of {', '.join(TASKS)}")
    asked = cfg.get("question") or cfg.get("questions") or cfg.get("choices")
    if cfg.task == "answer":
        choices = cfg.choices if not OmegaConf.is_config(cfg.choices) else list(cfg.choices)
        questions = cfg.questions if not OmegaConf.is_config(cfg.questions) else list(cfg.questions)
        question = None if cfg.question is None else str(cfg.question)
        return build_questions(question, questions, choices)
    if asked:
        raise InputSpecError(f"question=, questions= and choices= belong to task=answer, not task={cfg.task}")
    return [REPORT_QUESTION] if cfg.task == "report" else [Question(None, cfg.task)]


def run_settings(cfg: DictConfig, model: Model, extra: Mapping[str, Any]) -> dict[str, Any]:
    """What makes the rows: stored beside ``out`` and compared on every resumed run."""
    generation = (
        GenerationSettings(max_new_tokens=int(cfg.max_new_tokens)) if cfg.task in ("report", "answer") else None
    )
    return {
        **model_fingerprint(cfg.model_dir),
        "task": cfg.task,
        "dtype": cfg.dtype,
        "precision": str(cfg.trainer.precision),
        "image_size": None if model.image_size is None else list(model.image_size),
        "preprocessing": None if model.preprocessing is None else model.preprocessing.to_dict(),
        "generation": None if generation is None else asdict(generation),
        "embed_format": cfg.embed_format if cfg.task == "embed" else None,
        **extra,
    }


def zero_shot_scorer() -> tuple[Any, dict[str, Any]]:
    """The zero-shot eval's scoring (:class:`med3dvlm.evaluation.zero_shot.ZeroShotScorer`: CT-RATE's 18
    labels, a positive and a negative prompt each) and what of it the sidecar records."""
    from med3dvlm.evaluation.zero_shot import ZeroShotScorer

    scorer = ZeroShotScorer()
    record = {"labels": list(scorer.labels), "prompts": list(scorer.templates), "logit_scale": scorer.logit_scale}
    return scorer, {"zero_shot": record}


def cpu_threads(requested: Any, cores: int, num_workers: int, processes: int) -> int | None:
    """Torch threads for each predicting process on a CPU. ``auto``: the cores of this process's
    share left over by its DataLoader workers (at least one): workers and a main process whose
    threads spin for the same cores slow each other down (``bench_predict.py``: 1.5x). An integer
    sets it; null leaves torch's choice."""
    if requested is None:
        return None
    if str(requested) == "auto":
        return max(1, cores // max(1, processes) - num_workers)
    try:
        threads = int(requested)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        raise InputSpecError(f"threads={requested}: expected auto, null or a positive integer")
    return threads


def build_trainer(cfg: DictConfig, callbacks: Sequence[Any]):
    return hydra.utils.instantiate(cfg.trainer, callbacks=list(callbacks), logger=False)


def run_predict(cfg: DictConfig) -> RunSummary | None:
    """Runs ``cfg`` (``configs/predict.yaml``); rank 0 returns the summary (other ranks None)."""
    if cfg.on_bad_input not in ("skip", "error"):
        raise InputSpecError(f"on_bad_input={cfg.on_bad_input}: expected skip or error")
    questions = run_questions(cfg)
    inputs = find_inputs(cfg.inputs, cfg.input_column, cfg.limit)  # mistakes surface before the model loads
    preprocessing = (
        cfg.preprocessing if not OmegaConf.is_config(cfg.preprocessing) else OmegaConf.to_container(cfg.preprocessing)
    )
    model = load_predict_model(cfg.model_dir, dtype=cfg.dtype, preprocessing=preprocessing)
    scorer, extra = zero_shot_scorer() if cfg.task == "zero_shot" else (None, {})
    output = PredictionOutput(cfg.out, run_settings(cfg, model, extra), cfg.embed_format)
    if launched_as_rank_zero():
        output.open()  # a changed model or setting is refused before any other process starts
    module = BatchPredictor(
        model,
        cfg.task,
        output.settings["model"],
        generation=GenerationSettings(max_new_tokens=int(cfg.max_new_tokens)),
        fast_encoder=cfg.fast_encoder,
        on_bad_input=cfg.on_bad_input,
        scorer=scorer,
    )
    datamodule = PredictionDataModule(
        inputs, questions, output, model.image_size, model.preprocessing, cfg.batch_size, cfg.num_workers
    )
    writer = ShardWriter(output)
    trainer = build_trainer(cfg, [writer, VolumeProgress(cfg.progress)])
    threads = cpu_threads(cfg.get("threads", "auto"), available_cores(), int(cfg.num_workers), trainer.num_devices)
    callers_threads = torch.get_num_threads()
    if threads is not None and trainer.strategy.root_device.type == "cpu":
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    finally:
        torch.set_num_threads(callers_threads)  # a caller in the same process (a script, a test) keeps its own
    seconds = writer.loop_seconds if writer.loop_seconds is not None else time.perf_counter() - start
    trainer.strategy.barrier("predict-merge")  # every rank's shard complete
    if not trainer.is_global_zero:
        return None
    expected = len(inputs) * len(questions)
    pairs = [(path, question) for path in inputs for question in questions]
    order = {row_id(path, question): place for place, (path, question) in enumerate(pairs)}  # merged in input order
    merged = output.merge(order)
    summary = RunSummary(
        task=cfg.task,
        out=str(output.out),
        inputs=len(inputs),
        rows_expected=expected,
        rows_before=expected - sum(len(item.questions) for item in datamodule.pending),
        rows_written=merged.written,
        volumes_read=merged.volumes,
        seconds=seconds,
        bad=merged.bad,
        rows_per_rank=merged.rows_per_rank,
        bad_file=str(output.bad_path) if merged.bad else None,
    )
    output.write_summary(summary.to_dict())
    return summary
