"""Model-driven evaluation: batched generation with the VLM, resumable, then SPEC §7 scoring.

For each task (``caption``, ``vqa_closed``, ``vqa_open``) the first ``limit`` samples of a split
are answered in batches (greedy with the KV cache by default) and appended to
``<task>_predictions.jsonl`` as they come, so an interrupted run started again in the same output
folder generates only what is missing. The rows are then scored exactly as ``eval=score`` scores
a file (:mod:`med3dvlm.evaluation.scoring`), and the summary also records the generation throughput.

``seeds=[...]`` repeats sampled generation once per seed and reports mean ± std over them
(:mod:`med3dvlm.evaluation.seeds`).

What the model must offer (``Med3DVLM``): ``image_size`` (D, H, W), an ``image_encoder`` whose
parameters give the volumes' device and dtype, and
``answer(images (B, 1, D, H, W), questions: list[str], tasks: list[str], **generate_options) -> list[str]``
(``tasks``: each question's task, ``caption`` / ``vqa_closed`` / ...).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from med3dvlm.data import layout
from med3dvlm.data.samples import Sample
from med3dvlm.evaluation.predictions import PredictionWriter
from med3dvlm.evaluation.scoring import format_summary_table, score_predictions, write_scored_outputs
from med3dvlm.evaluation.seeds import (
    aggregate_seed_summaries,
    check_seeds,
    format_seed_table,
    seed_folder,
    write_seed_summary,
)
from med3dvlm.metrics.text import TextMetrics

log = logging.getLogger(__name__)

GENERATION_TASKS = ("caption", "vqa_closed", "vqa_open")
# SPEC §7: report generation is scored on the first 1000 test reports; VQA on the whole test CSV.
PAPER_CAPTION_LIMIT = 1000


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options passed to ``generate`` (greedy unless ``do_sample``)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def options(self) -> dict[str, Any]:
        chosen = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            knobs = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
            chosen.update({name: value for name, value in knobs.items() if value is not None})
        return chosen


@dataclass(frozen=True)
class TaskPlan:
    """One task of a run: which samples, how many per batch, how to decode."""

    task: str
    split: str
    limit: int | None
    batch_size: int
    generation: GenerationSettings
    num_workers: int = 0


def select_samples(data_root: str | Path, task: str, split: str, limit: int | None) -> list[Sample]:
    """The first ``limit`` samples of ``task`` in file order (SPEC §7 takes the first N)."""
    from med3dvlm.data.tasks import read_task_split

    samples = read_task_split(data_root, task, split).samples
    if not samples:
        raise ValueError(f"{data_root} holds no {task} samples in the {split} split")
    return samples if limit is None else samples[:limit]


def choices_from_prompt(prompt: str) -> dict[str, str] | None:
    """The four choice texts of a closed prompt written by ``layout.closed_prompt``, if it parses."""
    try:
        _, choices = layout.split_closed_prompt(prompt)
    except ValueError:
        return None
    return dict(zip(layout.ANSWER_LETTERS, choices))


def prediction_row(sample: Sample, prediction: str, data_root: Path) -> dict[str, Any]:
    """The JSONL row of one answered sample, in the format ``eval=score`` reads."""
    try:
        image = str(sample.image_path.relative_to(data_root))
    except ValueError:
        image = str(sample.image_path)
    row: dict[str, Any] = {"id": sample.source, "image": image, "prompt": sample.prompt}
    row.update(prediction=prediction, reference=sample.answer)
    if sample.question_type is not None:
        row["question_type"] = sample.question_type
    if sample.aspect is not None:
        row["question_aspect"] = sample.aspect
    if sample.answer_choice is not None:
        row["answer_choice"] = sample.answer_choice
        choices = dict(sample.choices) if sample.choices else choices_from_prompt(sample.prompt)
        if choices:
            row["choices"] = choices
    return row


class _Volumes(Dataset):
    """Loads the volumes of the samples still to answer, checked against the model's input size."""

    def __init__(self, samples: Sequence[Sample], image_size: Sequence[int]) -> None:
        self.samples = list(samples)
        self.image_size = tuple(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        from med3dvlm.data.volumes import load_volume

        volume = torch.from_numpy(load_volume(self.samples[index].image_path))
        if tuple(volume.shape[1:]) != self.image_size:
            raise ValueError(
                f"{self.samples[index].image_path}: volume of shape {tuple(volume.shape[1:])} but the model "
                f"takes {self.image_size} (D, H, W); prepare the data at the model's size"
            )
        return index, volume


def _stack(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor]:
    return [index for index, _ in items], torch.stack([volume for _, volume in items])


def generate_predictions(
    model: Any,
    samples: Sequence[Sample],
    writer: PredictionWriter,
    data_root: Path,
    batch_size: int,
    generation: GenerationSettings,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Answer the samples ``writer`` does not hold yet, batch by batch; returns the throughput."""
    pending = [sample for sample in samples if not writer.is_done(sample.source)]
    resumed = len(samples) - len(pending)
    if resumed:
        log.info("%d of %d samples already answered; generating %d", resumed, len(samples), len(pending))
    # volumes go to the image encoder's device and dtype (e.g. bfloat16 on a GPU)
    parameter = next(getattr(model, "image_encoder", model).parameters())
    loader = DataLoader(
        _Volumes(pending, model.image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_stack,
    )
    start = time.perf_counter()
    for indices, volumes in tqdm(loader, desc="generating", unit="batch", disable=None):
        batch = [pending[i] for i in indices]
        answers = model.answer(
            volumes.to(parameter.device, parameter.dtype),
            [s.prompt for s in batch],
            tasks=[s.task for s in batch],  # a released-splice model writes VQA prompts the released way
            **generation.options(),
        )
        writer.write(prediction_row(sample, answer, data_root) for sample, answer in zip(batch, answers))
    seconds = time.perf_counter() - start
    return {
        "generated": len(pending),
        "resumed": resumed,
        "seconds": seconds,
        "samples_per_second": len(pending) / seconds if pending and seconds > 0 else None,
    }


@dataclass
class PreparedTask:
    """A task whose samples are read and whose predictions file is open, before any model loads."""

    plan: TaskPlan
    samples: list[Sample]
    writer: PredictionWriter


def prepare_task(
    plan: TaskPlan, model_fingerprint: Mapping[str, Any], data_root: Path, output_dir: Path
) -> PreparedTask:
    """Read the samples and open ``<task>_predictions.jsonl`` (refusing one made with other settings)."""
    samples = select_samples(data_root, plan.task, plan.split, plan.limit)
    settings = dict(model_fingerprint) | {"task": plan.task, "split": plan.split} | asdict(plan.generation)
    return PreparedTask(plan, samples, PredictionWriter(output_dir / f"{plan.task}_predictions.jsonl", settings))


def run_task(
    model: Any,
    model_fingerprint: Mapping[str, Any],
    prepared: PreparedTask,
    data_root: Path,
    output_dir: Path,
    make_metrics: Callable[[], TextMetrics],
) -> dict[str, Any]:
    """Generate what is missing and score one task; writes predictions, scores, summary and table."""
    plan, samples, writer = prepared.plan, prepared.samples, prepared.writer
    throughput = generate_predictions(
        model, samples, writer, data_root, plan.batch_size, plan.generation, plan.num_workers
    )
    by_id = {row["id"]: row for row in writer.rows()}
    rows = [by_id[sample.source] for sample in samples]
    metrics = make_metrics() if plan.task != "vqa_closed" else None
    per_sample, summary = score_predictions(rows, plan.task, metrics)
    summary = (
        dict(model_fingerprint)
        | {"data_root": str(data_root), "split": plan.split, "limit": plan.limit}
        | summary
        | {"generation": asdict(plan.generation) | {"batch_size": plan.batch_size} | throughput}
    )
    write_scored_outputs(output_dir, rows, per_sample, summary)
    return summary


def format_throughput(summary: Mapping[str, Any]) -> str:
    generation = summary["generation"]
    rate = generation["samples_per_second"]
    done = f"{generation['generated']} generated in {generation['seconds']:.1f} s"
    done += f" ({rate:.2f} samples/s)" if rate else ""
    return done + (f", {generation['resumed']} resumed from an earlier run" if generation["resumed"] else "")


def plans_from_config(eval_cfg: Mapping[str, Any]) -> list[TaskPlan]:
    """Task plans of an ``eval`` config: one task (caption, vqa_*) or ``tasks`` of ``eval=all``.

    In ``eval=all`` each task has its own length unless the generation preset sets one for every
    task (``eval/generation=paper``: the released scripts' 256).
    """
    base = dict(eval_cfg["generation"])
    if "tasks" in eval_cfg:
        shared_length = base.pop("max_new_tokens", None)
        return [
            TaskPlan(
                task,
                eval_cfg["split"],
                options["limit"],
                options["batch_size"],
                GenerationSettings(**(base | {"max_new_tokens": shared_length or options["max_new_tokens"]})),
                eval_cfg["num_workers"],
            )
            for task, options in eval_cfg["tasks"].items()
        ]
    return [
        TaskPlan(
            eval_cfg["task"],
            eval_cfg["split"],
            eval_cfg["limit"],
            eval_cfg["batch_size"],
            GenerationSettings(**base),
            eval_cfg["num_workers"],
        )
    ]


def load_vlm(model_dir: str | Path, dtype: str | None, device: str) -> Any:
    """The ``Med3DVLM`` of an export folder or a stage-2/3 checkpoint, read as :func:`med3dvlm.load_model`
    reads it, in eval mode on ``device``."""
    from med3dvlm.api import load_model

    if not model_dir:
        raise ValueError("this suite needs the VLM: model_dir=DIR, a folder written by Med3DVLM.save_pretrained")
    loaded = load_model(model_dir, device=device, dtype=dtype)
    if loaded.kind != "vlm":
        raise ValueError(f"{model_dir} is a stage-1 (retrieval) model; this suite generates with a VLM (stages 2-3)")
    return loaded.model


def evaluate_tasks(
    plans: Sequence[TaskPlan],
    model_dir: str | Path,
    data_root: str | Path | None,
    output_dir: str | Path,
    make_metrics: Callable[[], TextMetrics],
    dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    seeds: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Load the VLM once, run every planned task, print each table; summaries by task.

    ``seeds``: run every task once per seed (sampling only), each in ``seed_<n>/`` of ``output_dir``,
    then write and print the mean ± std over the seeds (:mod:`med3dvlm.evaluation.seeds`), returned by task.
    """
    if not data_root:
        raise ValueError(
            "this suite needs data_root=DIR, a data root in the M3D layout (the exported model records no data), "
            "e.g. the phantom set under data/"
        )
    if not model_dir:
        raise ValueError("this suite needs the VLM: model_dir=DIR, a folder written by Med3DVLM.save_pretrained")
    data_root, output_dir = Path(data_root), Path(output_dir)
    if seeds is not None:
        seeds = check_seeds(seeds, sampling=all(plan.generation.do_sample for plan in plans))
    runs = [(seed, output_dir)] if seeds is None else [(s, seed_folder(output_dir, s)) for s in seeds]
    fingerprint = {"model_dir": str(Path(model_dir).resolve()), "dtype": dtype}
    # Data and resume problems surface before a large model is loaded. A sampled run's seed is part
    # of what made its predictions, so resuming with another seed is refused.
    prepared = []
    for run_seed, run_dir in runs:
        for plan in plans:
            task_fingerprint = fingerprint | ({"seed": run_seed} if plan.generation.do_sample else {})
            task = prepare_task(plan, task_fingerprint, data_root, run_dir)
            prepared.append((run_seed, run_dir, task_fingerprint, task))
    metrics: list[TextMetrics] = []

    def shared_metrics() -> TextMetrics:  # built once, for caption and open VQA alike
        if not metrics:
            metrics.append(make_metrics())
        return metrics[0]

    if any(plan.task != "vqa_closed" for plan in plans):
        shared_metrics()  # a missing metric model (e.g. BERTScore's) fails now, not after generating
    model = load_vlm(model_dir, dtype, device)
    summaries = {}

    by_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for run_seed, run_dir, task_fingerprint, task in prepared:
        torch.manual_seed(run_seed)  # sampling reproducible per task
        summary = run_task(model, task_fingerprint, task, data_root, run_dir, shared_metrics)
        print((f"Seed {run_seed}: " if seeds is not None else "") + format_summary_table(summary))
        print(f"Generation: {format_throughput(summary)}\n")
        summaries[task.plan.task] = summary
        by_seed.setdefault(task.plan.task, {})[run_seed] = summary
    if seeds is None:
        return summaries
    aggregated = {}
    for task_name, summaries_by_seed in by_seed.items():
        aggregated[task_name] = aggregate_seed_summaries(summaries_by_seed)
        write_seed_summary(output_dir, aggregated[task_name])
        print(format_seed_table(aggregated[task_name]) + "\n")
    return aggregated
