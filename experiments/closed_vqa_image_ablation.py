"""Does a VLM's closed-VQA accuracy come from the image? The same questions with their own volume
and with another case's volume.

    python experiments/closed_vqa_image_ablation.py MODEL DATA_ROOT [--split test] [--max-questions 320]
                                                    [--batch-size 8] [--json OUT]

MODEL is an export folder or a stage-3 checkpoint (anything ``med3dvlm.load_model`` reads as a VLM);
DATA_ROOT an M3D-layout root (e.g. the phantoms). Each closed question of ``split`` (the first
``max-questions``) is answered greedily twice: with its own volume, and with the volume of the next
case in the file (a different case; question and choices unchanged). Both are scored with the paper's
rule (SPEC §7: the answer letter followed by a period), per question type and overall.

Why: a model can beat chance on lettered choices from the text alone (a distractor that is never the
answer, letter habits). Those shortcuts survive the swap; what the model reads in the volume does not,
so the gap between the two columns is what the image contributes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def swap_partners(paths: Sequence[Path]) -> dict[Path, Path]:
    """Each distinct volume -> the next distinct volume in order of first appearance (cyclic)."""
    order = list(dict.fromkeys(paths))
    if len(order) < 2:
        raise SystemExit("the questions name only one volume: nothing to swap it with")
    return {path: order[(i + 1) % len(order)] for i, path in enumerate(order)}


def ablation(
    samples: Sequence,
    answer: Callable[[torch.Tensor, list[str]], list[str]],
    load: Callable[[Path], torch.Tensor],
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """``{"own": results, "swapped": results}``, each as ``med3dvlm.metrics.vqa.closed_vqa_accuracy``
    gives it; ``answer(images, questions)`` answers a batch, ``load(path)`` reads one volume."""
    from tqdm.auto import tqdm

    from med3dvlm.metrics.vqa import closed_answer_is_correct, closed_vqa_accuracy

    partner = swap_partners([s.image_path for s in samples])
    cache: dict[Path, torch.Tensor] = {}

    def volume(path: Path) -> torch.Tensor:
        if path not in cache:
            cache[path] = load(path)
        return cache[path]

    records: dict[str, list[dict]] = {"own": [], "swapped": []}
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in tqdm(batches, desc="closed questions", unit="batch", disable=not progress):
        prompts = [s.prompt for s in batch]
        for name, pick in (("own", lambda s: s.image_path), ("swapped", lambda s: partner[s.image_path])):
            predictions = answer(torch.stack([volume(pick(s)) for s in batch]), prompts)
            for sample, prediction in zip(batch, predictions):
                records[name].append(
                    {
                        "source": sample.source,
                        "question_type": sample.question_type,
                        "answer": sample.answer,
                        "prediction": prediction,
                        "correct": closed_answer_is_correct(prediction, sample.answer_choice),
                    }
                )
    return {name: closed_vqa_accuracy(rows) for name, rows in records.items()}


def format_table(report: dict) -> str:
    own, swapped = report["own"]["accuracy"], report["swapped"]["accuracy"]
    lines = [
        f"Closed VQA with each question's own volume and with another case's (chance {report['own']['chance']:.0%})",
        "",
        "| question type | own volume (%) | another case's volume (%) | questions |",
        "|---|---:|---:|---:|",
    ]
    for name, row in own.items():
        lines.append(
            f"| {name} | {100 * row['accuracy']:.2f} | {100 * swapped[name]['accuracy']:.2f} | {row['count']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="export folder or stage-3 checkpoint")
    parser.add_argument("data_root", type=Path, help="M3D-layout data root (e.g. the phantoms)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-questions", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the report (with every prediction) here")
    args = parser.parse_args(argv)

    from med3dvlm.api import load_model, model_input
    from med3dvlm.data.tasks import read_task_split

    wrapper = load_model(args.model)
    if wrapper.kind != "vlm":
        raise SystemExit(f"{args.model} is a {wrapper.kind} model; this ablation needs a VLM")
    vlm = wrapper.model
    samples = read_task_split(args.data_root, "vqa_closed", args.split).samples[: args.max_questions]
    if not samples:
        raise SystemExit(f"{args.data_root}: no closed questions in split {args.split!r}")

    def answer(images: torch.Tensor, questions: list[str]) -> list[str]:
        return vlm.answer(images, questions, max_new_tokens=args.max_new_tokens)

    with torch.no_grad():
        report = ablation(samples, answer, lambda path: model_input(path, vlm.image_size), args.batch_size)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
