"""Generation scores over several sampling seeds (``seeds=[...]``): mean ± standard deviation.

Sampled generation (``eval/generation=paper``, temperature 1.0) gives another score with every seed,
so one run is one draw. Each seed's run keeps its own files under ``seed_<n>/``; the summary of a
task sets them side by side: for every metric, overall and per question type, the mean over the seeds
and the sample standard deviation (n - 1 in the denominator; 0 for a single seed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from med3dvlm.evaluation.scoring import CLOSED_METRIC_NAMES, TASK_TITLES
from med3dvlm.metrics.text import METRIC_NAMES

STD_DEFINITION = "sample standard deviation over the seeds (n - 1); 0 for one seed"


def seed_folder(output_dir: str | Path, seed: int) -> Path:
    """Where one seed's predictions, scores and tables go."""
    return Path(output_dir) / f"seed_{seed}"


def check_seeds(seeds: Sequence[Any], sampling: bool) -> list[int]:
    """The seeds as distinct integers; refused when decoding is greedy (every seed would agree)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of integers, e.g. seeds=[1,2,3]; got {seeds!r}")
    if any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise ValueError(f"seeds must be integers, e.g. seeds=[1,2,3]; got {list(seeds)!r}")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise ValueError(f"seeds {repeated} are listed more than once in seeds={list(seeds)}")
    if not sampling:
        raise ValueError(
            "seeds=[...] repeats sampled generation, but decoding is greedy (eval.generation.do_sample=false), so "
            "every seed gives the same answers; use eval/generation=paper (or sampling), or drop seeds"
        )
    return [int(seed) for seed in seeds]


def _statistics(per_seed: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for key in keys:
        values = [float(scores[key]) for scores in per_seed]
        stats[key] = {"mean": fmean(values), "std": stdev(values) if len(values) > 1 else 0.0}
    return stats | {"count": per_seed[0]["count"]}


def aggregate_seed_summaries(by_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One task's summaries by seed -> mean and std of every metric, with each seed's values kept."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    keys = first["metrics"]
    grouped = ("by_question_type", "by_question_aspect")
    kept = {k: v for k, v in first.items() if k not in ("seed", "overall", "generation", *grouped)}
    summary: dict[str, Any] = kept | {"seeds": seeds, "std": STD_DEFINITION}
    summary["overall"] = _statistics([by_seed[s]["overall"] for s in seeds], keys)
    for group in grouped:
        if group in first:
            summary[group] = {
                name: _statistics([by_seed[s][group][name] for s in seeds], keys) for name in first[group]
            }
    settings = {k: v for k, v in first["generation"].items() if k not in ("generated", "resumed", "seconds")}
    summary["generation"] = {k: v for k, v in settings.items() if k != "samples_per_second"}
    summary["per_seed"] = {
        str(seed): {k: by_seed[seed][k] for k in ("overall", *grouped, "generation") if k in by_seed[seed]}
        for seed in seeds
    }
    return summary


def format_seed_table(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per question type (VQA) and overall, each metric as mean ± std in percent."""
    task, keys = summary["task"], summary["metrics"]
    names = CLOSED_METRIC_NAMES if task == "vqa_closed" else METRIC_NAMES
    header = (["question type"] if task != "caption" else []) + ["samples"] + [names[key] for key in keys]
    seeds = ", ".join(str(seed) for seed in summary["seeds"])
    lines = [
        f"{TASK_TITLES[task]} ({task}), {summary['num_samples']} samples, mean ± std over seeds {seeds}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":---" if i == 0 and task != "caption" else "---:" for i in range(len(header))) + "|",
    ]

    def table_row(label: str | None, values: Mapping[str, Any]) -> str:
        cells = ([label] if label is not None else []) + [str(values["count"])]
        cells += [f"{100 * values[key]['mean']:.2f} ± {100 * values[key]['std']:.2f}" for key in keys]
        return "| " + " | ".join(cells) + " |"

    if task != "caption":
        lines += [table_row(name, values) for name, values in summary["by_question_type"].items()]
    lines.append(table_row("Overall" if task != "caption" else None, summary["overall"]))
    if summary.get("by_question_aspect"):
        lines += ["", "| " + " | ".join(["question aspect", *header[1:]]) + " |", lines[3]]
        lines += [table_row(name, values) for name, values in summary["by_question_aspect"].items()]
    lines.append(f"\nstd: {STD_DEFINITION}.")
    lines += [f"\nNote: {note}" for note in summary.get("notes", [])]
    return "\n".join(lines)


def write_seed_summary(output_dir: str | Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """``<task>_summary.json`` and ``<task>_table.md`` of the seeds, beside the ``seed_<n>/`` folders."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task = summary["task"]
    paths = {"summary": output_dir / f"{task}_summary.json", "table": output_dir / f"{task}_table.md"}
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["table"].write_text(format_seed_table(summary) + "\n", encoding="utf-8")
    return paths
