"""Does a VLM's image pathway carry the image? Statistics of the tokens the LLM reads.

    python experiments/diagnose_image_tokens.py MODEL DATA_ROOT [--split test] [--max-volumes 96] [--json OUT]

MODEL is an export folder or a stage-2/3 checkpoint (anything ``med3dvlm.load_model`` reads);
DATA_ROOT an M3D-layout root (e.g. the phantoms). For the encoder's two projector inputs (s3, s4)
and the projector's output it prints the between-volume variation (norm of the per-position
standard deviation over volumes / norm of the mean: near 0 means every volume gives the same
tokens) and the mean token norm next to the LLM's word-embedding norm; then, per closed-question
type, the leave-one-out nearest-centroid accuracy of predicting the answer from the flattened
projector output (is the answer linearly there for the LLM to read?) against the majority rate.

Why: a projector trained into a frozen LLM can turn into a constant soft prompt (the variation of its
output collapses while the loss falls), and then no amount of fine-tuning makes the model use the
image. This separates "the information is not in the tokens" from "the LLM does not read it".
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

ANSWER_LETTER = re.compile(r"^[A-D]\.\s*")


def between_volume_variation(tokens: torch.Tensor) -> float:
    """``|std over volumes| / |mean over volumes|`` of ``(V, ...)`` tokens, every position flattened."""
    flat = tokens.flatten(1).double()
    return float(flat.std(dim=0).norm() / flat.mean(dim=0).norm().clamp_min(1e-12))


def nearest_centroid_accuracy(features: torch.Tensor, labels: list[str]) -> float:
    """Leave-one-out accuracy of the nearest class centroid (Euclidean); classes seen once are skipped."""
    counts = Counter(labels)
    features = features.flatten(1).double()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(features.shape[1], dtype=torch.float64))
    for feature, label in zip(features, labels):
        sums[label] += feature
    correct = total = 0
    for feature, label in zip(features, labels):
        if counts[label] < 2:
            continue
        distances = {}
        for name, total_sum in sums.items():
            n = counts[name] - (name == label)
            if n == 0:
                continue
            centroid = (total_sum - feature * (name == label)) / n
            distances[name] = float((feature - centroid).norm())
        correct += min(distances, key=distances.get) == label
        total += 1
    return correct / total if total else float("nan")


def closed_answers(root: Path, split: str) -> dict[str, dict[Path, str]]:
    """``{question type: {volume: answer text}}`` from the closed questions of ``split``."""
    from med3dvlm.data.tasks import read_task_split

    answers: dict[str, dict[Path, str]] = defaultdict(dict)
    for sample in read_task_split(root, "vqa_closed", split).samples:
        answers[sample.question_type or "Unknown"].setdefault(sample.image_path, ANSWER_LETTER.sub("", sample.answer))
    return answers


def diagnose(model_path: str, root: Path, split: str = "test", max_volumes: int = 96) -> dict:
    from med3dvlm.api import load_model, model_input
    from med3dvlm.models.vlm import VISION_SELECT_LAYER

    wrapper = load_model(model_path)
    if wrapper.kind != "vlm":
        raise SystemExit(f"{model_path} is a {wrapper.kind} model; this diagnoses a VLM's image tokens")
    vlm = wrapper.model
    answers = closed_answers(root, split)
    volumes = sorted({path for by_volume in answers.values() for path in by_volume})[:max_volumes]
    if len(volumes) < 4:
        raise SystemExit(f"{root}: only {len(volumes)} volumes with closed questions in split {split!r}")
    images = torch.stack([model_input(path, vlm.image_size) for path in volumes])
    with torch.no_grad():
        stages = vlm.image_encoder(images)
        low, high = stages[VISION_SELECT_LAYER], stages[-1]
        tokens = vlm.projector(low, high)
        words = vlm.base_language_model().get_input_embeddings().weight.detach()
    report = {
        "volumes": len(volumes),
        "variation": {
            name: between_volume_variation(t) for name, t in (("s3", low), ("s4", high), ("projector", tokens))
        },
        "norm": {
            "projector_token": float(tokens.norm(dim=-1).mean()),
            "word_embedding": float(words.norm(dim=-1).mean()),
        },
        "decodable": {},
    }
    for question_type, by_volume in answers.items():
        kept = [i for i, path in enumerate(volumes) if path in by_volume]
        labels = [by_volume[volumes[i]] for i in kept]
        if len(set(labels)) < 2 or max(Counter(labels).values()) < 2:
            continue  # one answer only, or no answer seen twice: nothing to score
        majority = Counter(labels).most_common(1)[0][1] / len(labels)
        accuracy = nearest_centroid_accuracy(tokens[kept], labels)
        report["decodable"][question_type] = {"nearest_centroid": accuracy, "majority": majority, "volumes": len(kept)}
    return report


def print_report(report: dict) -> None:
    print(f"{report['volumes']} volumes")
    print("| tokens | between-volume variation |")
    print("|---|---:|")
    for name, value in report["variation"].items():
        print(f"| {name} | {value:.3f} |")
    norms = report["norm"]
    print(
        f"mean norm: projector token {norms['projector_token']:.2f}, LLM word embedding {norms['word_embedding']:.2f}"
    )
    print("| question type | nearest-centroid LOO accuracy | majority rate | volumes |")
    print("|---|---:|---:|---:|")
    for name, row in report["decodable"].items():
        print(f"| {name} | {row['nearest_centroid']:.3f} | {row['majority']:.3f} | {row['volumes']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="export folder or stage-2/3 checkpoint")
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-volumes", type=int, default=96)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    report = diagnose(args.model, args.data_root, args.split, args.max_volumes)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
