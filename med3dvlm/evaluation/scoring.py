"""Scoring of prediction rows: per-sample scores, the summary (SPEC §7) and its markdown table.

One path for every source of predictions: the model-driven suites and ``eval=score`` on another
system's file both end in :func:`score_predictions`, so their numbers are comparable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from med3dvlm.evaluation.predictions import infer_task, read_predictions, validate_rows, write_jsonl
from med3dvlm.metrics.text import METRIC_NAMES, TextMetrics
from med3dvlm.metrics.vqa import mean_scores, means_by_group, means_by_question_type, score_closed_answer

log = logging.getLogger(__name__)

CLOSED_METRIC_NAMES = {"accuracy": "accuracy (paper rule)", "strict_accuracy": "strict accuracy"}
TASK_TITLES = {
    "caption": "Report generation",
    "vqa_open": "Open-ended VQA",
    "vqa_closed": "Closed-ended VQA",
}


def _closed_per_sample(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [score_closed_answer(row["prediction"], row["answer_choice"], row.get("choices")) for row in rows]


def score_predictions(
    rows: list[dict[str, Any]], task: str | None = None, metrics: TextMetrics | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score prediction rows (see :mod:`med3dvlm.evaluation.predictions`) for ``task``.

    Returns the per-sample scores (one dict per row, in order) and the summary: ``overall`` and,
    for VQA, ``by_question_type`` averages (fractions; ``count`` = samples), plus the metric
    ``settings`` and ``notes`` on departures from the paper's protocol. ``metrics`` is needed for
    ``caption`` and ``vqa_open`` (a default :class:`TextMetrics` is built when omitted).
    """
    task = task or infer_task(rows)
    rows = validate_rows(rows, task)
    if task == "vqa_closed":
        per_sample = _closed_per_sample(rows)
        keys: tuple[str, ...] = ("accuracy", "strict_accuracy")
        averaged = [
            {"accuracy": float(s["correct"]), "strict_accuracy": float(s["strict_correct"])} for s in per_sample
        ]
        settings: dict[str, Any] = {"rule": "answer letter followed by '.' contained in the output (SPEC §7)"}
        notes: list[str] = []
    else:
        metrics = metrics or TextMetrics()
        per_sample = metrics.score([row["prediction"] for row in rows], [row["reference"] for row in rows])
        keys, averaged = metrics.keys, per_sample
        settings, notes = metrics.settings, metrics.notes()
    summary: dict[str, Any] = {
        "task": task,
        "num_samples": len(rows),
        "metrics": list(keys),
        "overall": mean_scores(averaged, keys),
    }
    if task != "caption":
        types = [row["question_type"] for row in rows]
        summary["by_question_type"] = means_by_question_type(averaged, types, keys)
        aspects = [row.get("question_aspect") for row in rows]
        named_aspects = sorted({aspect for aspect in aspects if aspect})
        if named_aspects:  # 3D-RAD: a second table by QuestionAspect
            summary["by_question_aspect"] = means_by_group(averaged, aspects, keys, named_aspects)
    summary["settings"] = settings
    summary["notes"] = notes
    return per_sample, summary


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """Markdown: a title, one row per question type (VQA) and overall, values in percent, then notes."""
    keys = summary["metrics"]
    names = CLOSED_METRIC_NAMES if summary["task"] == "vqa_closed" else METRIC_NAMES
    header = ["question type", "samples"] if summary["task"] != "caption" else ["samples"]
    header += [names[key] for key in keys]
    lines = [
        f"{TASK_TITLES[summary['task']]} ({summary['task']}), {summary['num_samples']} samples",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":---" if i == 0 and summary["task"] != "caption" else "---:" for i in range(len(header))) + "|",
    ]

    def table_row(label: str | None, values: Mapping[str, float]) -> str:
        cells = ([label] if label is not None else []) + [str(values["count"])]
        cells += [f"{100 * values[key]:.2f}" for key in keys]
        return "| " + " | ".join(cells) + " |"

    if summary["task"] == "caption":
        lines.append(table_row(None, summary["overall"]))
    else:
        lines += [table_row(name, values) for name, values in summary["by_question_type"].items()]
        lines.append(table_row("Overall", summary["overall"]))
        if summary.get("by_question_aspect"):
            lines += ["", "| " + " | ".join(["question aspect", *header[1:]]) + " |", lines[3]]
            lines += [table_row(name, values) for name, values in summary["by_question_aspect"].items()]
    lines += [f"\nNote: {note}" for note in summary.get("notes", [])]
    return "\n".join(lines)


def write_scored_outputs(
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    per_sample: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
) -> dict[str, Path]:
    """``<task>_scores.jsonl`` (each row with its ``scores``), ``<task>_summary.json``, ``<task>_table.md``."""
    output_dir = Path(output_dir)
    task = summary["task"]
    scored = [dict(row) | {"scores": dict(scores)} for row, scores in zip(rows, per_sample)]
    paths = {
        "scores": write_jsonl(output_dir / f"{task}_scores.jsonl", scored),
        "summary": output_dir / f"{task}_summary.json",
        "table": output_dir / f"{task}_table.md",
    }
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["table"].write_text(format_summary_table(summary) + "\n", encoding="utf-8")
    return paths


def score_file(
    predictions: str | Path,
    output_dir: str | Path,
    task: str | None = None,
    make_metrics: Callable[[], TextMetrics] = TextMetrics,
) -> dict[str, Any]:
    """Score a predictions JSONL file and write the scored rows, summary JSON and table.

    ``make_metrics`` is called only for text tasks, so closed VQA needs no metric models.
    """
    rows, task = read_predictions(predictions, task)
    metrics = make_metrics() if task != "vqa_closed" else None
    per_sample, summary = score_predictions(rows, task, metrics)
    summary = {"predictions": str(predictions)} | summary
    paths = write_scored_outputs(output_dir, rows, per_sample, summary)
    log.info("%s scores written to %s", task, paths["summary"])
    return summary
