"""The Lightning side of ``predict``: a module that runs a loaded model over batches, and the callbacks
that write each rank's rows as they come and show the progress.

:class:`BatchPredictor` wraps a :mod:`med3dvlm.api` model (the ``nn.Module`` it holds is this
module's child, so Lightning puts it on the rank's device). One ``predict_step`` handles a batch of
volumes at once: one encoder pass for ``embed`` / ``zero_shot``, one batched greedy generation (left
padding, KV cache) for ``report`` / ``answer`` (every pending question of every volume of the batch).
On a CPU a DCFormer is swapped for :class:`~med3dvlm.models.fast_encoder.FastDCFormer` (same outputs
within 1e-5, 2.4-3.7x faster at the paper's size; ``fast_encoder=false`` keeps the plain module).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from med3dvlm.api import Model
from med3dvlm.evaluation.generate import GenerationSettings
from med3dvlm.predicting.data import BadInput, PendingInput, VolumeBatch
from med3dvlm.predicting.inputs import Question
from med3dvlm.predicting.outputs import SHARD_EMBEDDING_FIELD, PredictionOutput, encode_embedding, row_id

log = logging.getLogger(__name__)

ON_BAD_INPUT = ("skip", "error")
# Without a terminal (a batch job's log) the progress is a log line this often, in seconds.
PROGRESS_LOG_INTERVAL_S = 30.0


class BadInputStop(RuntimeError):
    """``on_bad_input=error``: the first input that failed ends the run."""

    def __init__(self, bad: BadInput) -> None:
        super().__init__(
            f"{bad.path}: {bad.reason} (on_bad_input=error stops at the first bad input; the rows written before "
            "it are kept, and on_bad_input=skip lists the bad inputs and goes on)"
        )
        self.bad = bad


@dataclass
class PredictedBatch:
    """What one ``predict_step`` gives the writer: finished rows, failed inputs, volumes run."""

    rows: list[dict[str, Any]]
    bad: list[BadInput]
    volumes: int = 0


def wants_fast_encoder(setting: str | bool, device: torch.device) -> bool:
    """``fast_encoder``: ``auto`` = on a CPU (FastDCFormer's kernels are CPU work), true, false."""
    if isinstance(setting, str):
        lowered = setting.strip().lower()
        if lowered == "auto":
            return device.type == "cpu"
        if lowered in ("true", "false"):
            return lowered == "true"
        raise ValueError(f"fast_encoder={setting!r}: expected auto, true or false")
    return bool(setting)


class BatchPredictor(L.LightningModule):
    """Runs ``model`` (a :mod:`med3dvlm.api` model) for ``task`` over :class:`VolumeBatch` es.

    ``scorer`` (``task=zero_shot``): ``(model, image embeddings (B, dim)) -> one output per volume``.
    """

    def __init__(
        self,
        model: Model,
        task: str,
        model_id: str,
        generation: GenerationSettings | None = None,
        fast_encoder: str | bool = "auto",
        on_bad_input: str = "skip",
        scorer: Callable[[Model, torch.Tensor], Sequence[Any]] | None = None,
    ) -> None:
        super().__init__()
        if on_bad_input not in ON_BAD_INPUT:
            raise ValueError(f"on_bad_input={on_bad_input!r}: expected one of {', '.join(ON_BAD_INPUT)}")
        needs = "vlm" if task in ("report", "answer") else "retrieval"
        if model.kind != needs:
            what = "a VLM (stages 2-3)" if needs == "vlm" else "a stage-1 (SigLIP) model"
            have = "a VLM" if model.kind == "vlm" else "a stage-1 model"
            raise ValueError(f"task={task} needs {what}, but model_dir is {have}")
        if task == "zero_shot" and scorer is None:
            raise ValueError("task=zero_shot needs a scorer")
        wants_fast_encoder(fast_encoder, torch.device("cpu"))  # a bad value fails now, not at the first batch
        self.api_model = model
        self.network = model.model  # the nn.Module: a child, so Lightning moves it
        self.task = task
        self.model_id = model_id
        self.generation = generation or GenerationSettings()
        self.fast_encoder = fast_encoder
        self.on_bad_input = on_bad_input
        self.scorer = scorer
        self.volume_dtype = torch.float32

    def on_predict_start(self) -> None:
        from med3dvlm.models.dcformer import DCFormer
        from med3dvlm.models.fast_encoder import FastDCFormer

        encoder = self.network.image_encoder
        first = next(itertools.chain(encoder.parameters(), encoder.buffers()))
        if (
            isinstance(encoder, DCFormer)
            and first.dtype == torch.float32
            and wants_fast_encoder(self.fast_encoder, self.device)
        ):
            self.network.image_encoder = FastDCFormer.from_module(encoder)
            log.info("image encoder: FastDCFormer (BatchNorm folded, channels-last; fast_encoder=false keeps DCFormer)")
        encoder = self.network.image_encoder
        self.volume_dtype = next(itertools.chain(encoder.parameters(), encoder.buffers())).dtype

    # -- one batch -----------------------------------------------------------------------------
    def predict_step(self, batch: VolumeBatch, batch_idx: int) -> PredictedBatch:
        if batch.bad and self.on_bad_input == "error":
            raise BadInputStop(batch.bad[0])
        if batch.volumes is None:
            return PredictedBatch([], batch.bad)
        start = time.perf_counter()
        volumes = batch.volumes.to(self.device, self.volume_dtype)
        if self.task in ("report", "answer"):
            outputs = self._generate(volumes, batch.inputs)
        else:
            embeddings = self.network.encode_image(volumes).float().cpu()
            per_volume = self.scorer(self.api_model, embeddings) if self.task == "zero_shot" else embeddings
            outputs = [[value] for value in per_volume]
        seconds = time.perf_counter() - start
        count = sum(len(item.questions) for item in batch.inputs)
        rows = [
            self.row(item, question, output, seconds / count, read_seconds)
            for item, answers, read_seconds in zip(batch.inputs, outputs, batch.read_seconds)
            for question, output in zip(item.questions, answers)
        ]
        return PredictedBatch(rows, batch.bad, len(batch.inputs))

    def _generate(self, volumes: torch.Tensor, inputs: Sequence[PendingInput]) -> list[list[str]]:
        """Every pending question of every volume in one batched generation; answers per volume."""
        repeats = torch.tensor([len(item.questions) for item in inputs], device=volumes.device)
        questions = [question for item in inputs for question in item.questions]
        answers = self.network.answer(
            volumes.repeat_interleave(repeats, dim=0),
            [question.prompt for question in questions],
            tasks=[generation_task(question) for question in questions],  # a released model's prompt form
            **self.generation.options(),
        )
        answers = [answer.strip() for answer in answers]
        grouped, start = [], 0
        for item in inputs:
            grouped.append(answers[start : start + len(item.questions)])
            start += len(item.questions)
        return grouped

    def row(self, item: PendingInput, question: Question, output: Any, seconds: float, read_seconds: float) -> dict:
        row: dict[str, Any] = {"id": row_id(item.path, question), "input": item.path, "task": self.task}
        if question.text is not None:
            row["question"] = question.text
            if question.choices:
                row["choices"] = question.choices
        if self.task == "embed":
            row[SHARD_EMBEDDING_FIELD] = encode_embedding(np.asarray(output, dtype=np.float32))
        else:
            row["output"] = output
        row.update(model=self.model_id, seconds=round(seconds, 6), read_seconds=round(read_seconds, 6))
        return row


def generation_task(question: Question) -> str:
    """The eval's task name of a question: how a released-splice VLM writes its prompt (SPEC §5)."""
    if question.text is None:
        return "caption"
    return "vqa_closed" if question.choices else "vqa_open"


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------


class ShardWriter(BasePredictionWriter):
    """Appends each batch's rows to this rank's shard (flushed before the next batch starts) and
    its bad inputs to the rank's list; times this rank's loop."""

    def __init__(self, output: PredictionOutput) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.writer = None
        self.loop_start: float | None = None
        self.loop_seconds: float | None = None  # this rank's predict loop (None: it had nothing to do)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.loop_start = time.perf_counter()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.loop_start is not None:
            self.loop_seconds = time.perf_counter() - self.loop_start

    def write_on_batch_end(
        self, trainer, pl_module, prediction: PredictedBatch, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if prediction.rows:
            if self.writer is None:
                self.writer = self.output.shard_writer(trainer.global_rank)
            self.writer.write(prediction.rows)
        self.output.record_bad(trainer.global_rank, (bad.record() for bad in prediction.bad))


class VolumeProgress(Callback):
    """Rank 0's volumes done, volumes/s and the ETA: a tqdm bar on a terminal, else a log line
    every :data:`PROGRESS_LOG_INTERVAL_S` (a batch job's log stays readable)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.total = 0
        self.done = 0
        self.start = 0.0
        self.last_log = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        self.total = len(getattr(trainer.datamodule, "local", []))
        self.start = self.last_log = time.perf_counter()
        if sys.stderr.isatty():
            from tqdm import tqdm

            ranks = f" (rank 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
            self.bar = tqdm(total=self.total, unit="vol", desc=f"predict{ranks}", dynamic_ncols=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        self.done += len(batch)
        if self.bar is not None:
            self.bar.update(len(batch))
            return
        now = time.perf_counter()
        if now - self.last_log >= PROGRESS_LOG_INTERVAL_S or self.done == self.total:
            self.last_log = now
            rate = self.done / (now - self.start) if now > self.start else 0.0
            eta = (self.total - self.done) / rate if rate else float("nan")
            log.info("predict: %d/%d volumes, %.2f volumes/s, ETA %.0f s", self.done, self.total, rate, eta)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
