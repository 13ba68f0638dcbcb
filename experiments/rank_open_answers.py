"""Does the LLM read the image tokens? Rank the four choice texts as answers to the open question.

    python experiments/rank_open_answers.py MODEL DATA_ROOT [--split validation] [--max-questions 160] [--json OUT]

MODEL is an export folder or a stage-2/3 checkpoint (anything ``med3dvlm.load_model`` reads as a VLM);
DATA_ROOT an M3D-layout root (e.g. the phantoms). For each closed question of ``split`` (the first
``max-questions``) the question is asked without its choices, and each of the four choice texts is
scored as the answer by its summed token log-likelihood (answer + EOS, as stage 2 trains it). The
question counts as right when the true answer scores highest; chance is 25 %.

Why: a stage-2 model cannot answer lettered choices (its LLM is frozen and may never have learnt
to), so closed-VQA accuracy says nothing about it. This asks what stage 2 trains for: whether the
LLM, reading the projector's tokens, prefers the answer the volume shows.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from med3dvlm.data import layout


def answer_log_likelihoods(vlm, image: torch.Tensor, question: str, answers: Sequence[str]) -> list[float]:
    """Summed log-likelihood of each ``answers[i] + EOS`` after the image prompt of ``question``."""
    from med3dvlm.models.vlm import image_prompt, pad_sequences

    tokenizer = vlm.tokenizer
    prompt = image_prompt(question, vlm.num_image_tokens)
    prompt_ids = tokenizer(prompt)["input_ids"]
    sequences = [tokenizer(f"{prompt} {answer}")["input_ids"] + [tokenizer.eos_token_id] for answer in answers]
    input_ids, attention_mask = pad_sequences(sequences, tokenizer.pad_token_id, side="right")
    images = image.unsqueeze(0).expand(len(answers), *image.shape)
    log_probs = F.log_softmax(vlm(images, input_ids, attention_mask).logits.float(), dim=-1)
    scores = []
    for row, sequence in enumerate(sequences):
        targets = torch.tensor(sequence[len(prompt_ids) :])
        positions = torch.arange(len(prompt_ids) - 1, len(sequence) - 1)
        scores.append(float(log_probs[row, positions, targets].sum()))
    return scores


def rank_open_answers(vlm, samples: Sequence, load, progress: bool = True) -> dict:
    """Accuracy per question type and overall (``closed_vqa_accuracy``'s layout) of the top-ranked text."""
    from tqdm.auto import tqdm

    from med3dvlm.metrics.vqa import closed_vqa_accuracy

    records = []
    for sample in tqdm(samples, desc="questions", unit="q", disable=not progress):
        question, choices = layout.split_closed_prompt(sample.prompt)
        with torch.no_grad():
            scores = answer_log_likelihoods(vlm, load(sample.image_path), question, choices)
        best = layout.ANSWER_LETTERS[scores.index(max(scores))]
        records.append(
            {
                "source": sample.source,
                "question_type": sample.question_type,
                "answer": sample.answer,
                "scores": dict(zip(layout.ANSWER_LETTERS, scores)),
                "correct": best == sample.answer_choice,
            }
        )
    return closed_vqa_accuracy(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="export folder or stage-2/3 checkpoint")
    parser.add_argument("data_root", type=Path, help="M3D-layout data root (e.g. the phantoms)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-questions", type=int, default=160)
    parser.add_argument("--json", type=Path, help="also write the report (with every score) here")
    args = parser.parse_args(argv)

    from med3dvlm.api import load_model, model_input
    from med3dvlm.data.tasks import read_task_split

    wrapper = load_model(args.model)
    if wrapper.kind != "vlm":
        raise SystemExit(f"{args.model} is a {wrapper.kind} model; this ranks a VLM's answers")
    vlm = wrapper.model
    samples = read_task_split(args.data_root, "vqa_closed", args.split).samples[: args.max_questions]
    if not samples:
        raise SystemExit(f"{args.data_root}: no closed questions in split {args.split!r}")
    load = functools.lru_cache(maxsize=None)(lambda path: model_input(path, vlm.image_size))  # 8 questions a volume
    report = rank_open_answers(vlm, samples, load)
    print(f"Open answers ranked among the four choice texts (chance {report['chance']:.0%})\n")
    print("| question type | top-ranked is right (%) | questions |\n|---|---:|---:|")
    for name, row in report["accuracy"].items():
        print(f"| {name} | {100 * row['accuracy']:.2f} | {row['count']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
