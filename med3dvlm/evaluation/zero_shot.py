"""Zero-shot abnormality classification with a stage-1 (SigLIP/CLIP) model, CT-CLIP's protocol.

For each label the volume is compared with a positive and a negative prompt; a softmax over the two
similarities gives the probability that the abnormality is present. CT-CLIP's released zero-shot
script (``scripts/zero_shot.py`` of ibrahimethemhamamci/CT-CLIP, commit b97fab6) builds the pair
``[f"{pathology} is present.", f"{pathology} is not present."]``, takes the model's output (cosine
similarity times its learned temperature ``exp(t)``), applies a softmax over the pair and keeps the
first entry; earlier commits of the same script used ``"{pathology}."`` / ``"not {pathology}."``.

Probability: ``softmax(logit_scale * [cos(volume, positive), cos(volume, negative)])[0]``, which is
``sigmoid(logit_scale * (cos_pos - cos_neg))``. A SigLIP bias would cancel in the pair. The exported
stage-1 folder keeps no logit scale (it lives in the training loss), so one fixed scale is used for
every model: :data:`DEFAULT_LOGIT_SCALE`. For any positive scale, AUROC and the decisions at
threshold 0.5 (positive prompt closer than the negative one) are the same: the scale shapes only the
probability values and decisions at other thresholds.

Public functions (also used by batch prediction's ``task=zero_shot``): :func:`label_prompts`,
:func:`embed_label_prompts`, :func:`probabilities_from_embeddings`, :class:`ZeroShotScorer`,
:func:`zero_shot_probabilities`, :func:`zero_shot_metrics`, :func:`format_zero_shot_table`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from med3dvlm.data.ct_rate import ABNORMALITY_LABELS
from med3dvlm.models.losses import SIGLIP_PAPER_LOGIT_SCALE

# CT-CLIP's prompt pair (scripts/zero_shot.py of ibrahimethemhamamci/CT-CLIP, commit b97fab6).
POSITIVE_PROMPT = "{label} is present."
NEGATIVE_PROMPT = "{label} is not present."
PROMPT_TEMPLATES = (POSITIVE_PROMPT, NEGATIVE_PROMPT)
# Not in CT-CLIP (its exported weights carry their own temperature, ours do not): exp(t') at the
# SigLIP paper's initial t' = log 10 (SPEC §3), the scale a stage-1 model of this project starts from.
DEFAULT_LOGIT_SCALE = math.exp(SIGLIP_PAPER_LOGIT_SCALE)
# Not from a paper: the pair softmax's natural decision point (the positive prompt is the closer
# one). A volume counts as positive when its probability is strictly above the threshold
# (torchmetrics' binary convention).
DEFAULT_THRESHOLD = 0.5
# Volumes per encoder pass when the caller gives none.
DEFAULT_BATCH_SIZE = 8
METRICS = ("auroc", "f1", "accuracy")
METRIC_TITLES = {"auroc": "AUROC", "f1": "F1", "accuracy": "accuracy"}


def label_prompts(
    labels: Sequence[str] = ABNORMALITY_LABELS, templates: Sequence[str] = PROMPT_TEMPLATES
) -> list[tuple[str, str]]:
    """``(positive prompt, negative prompt)`` per label, in label order; ``templates`` hold ``{label}``."""
    if isinstance(labels, str) or not labels:
        raise ValueError("labels must be a non-empty list of label names")
    if isinstance(templates, str) or len(templates) != 2:
        raise ValueError(f"templates must be (positive, negative), two strings with {{label}}; got {templates!r}")
    for template in templates:
        if "{label}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{label}} placeholder")
    positive, negative = templates
    return [(positive.format(label=label), negative.format(label=label)) for label in labels]


def embed_label_prompts(
    model, labels: Sequence[str] = ABNORMALITY_LABELS, templates: Sequence[str] = PROMPT_TEMPLATES
) -> torch.Tensor:
    """``(L, 2, dim)`` unit text embeddings of each label's (positive, negative) prompts."""
    prompts = label_prompts(labels, templates)
    flat = [text for pair in prompts for text in pair]
    return model.embed_texts(flat).reshape(len(prompts), 2, -1)


def probabilities_from_embeddings(
    image_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE
) -> torch.Tensor:
    """``(N, L)`` probabilities that each label is present, from ``(N, dim)`` image embeddings and the
    ``(L, 2, dim)`` prompt embeddings of :func:`embed_label_prompts` (module docstring)."""
    if image_embeddings.ndim != 2 or prompt_embeddings.ndim != 3 or prompt_embeddings.shape[1] != 2:
        raise ValueError(
            "expected image embeddings (N, dim) and prompt embeddings (labels, 2, dim); got "
            f"{tuple(image_embeddings.shape)} and {tuple(prompt_embeddings.shape)}"
        )
    if image_embeddings.shape[-1] != prompt_embeddings.shape[-1]:
        raise ValueError(
            f"image embeddings have width {image_embeddings.shape[-1]}, prompt embeddings {prompt_embeddings.shape[-1]}"
        )
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale}")
    similarity = torch.einsum("nd,lkd->nlk", image_embeddings.double(), prompt_embeddings.double())
    return torch.softmax(float(logit_scale) * similarity, dim=-1)[..., 0].float()


class ZeroShotScorer:
    """``scorer(model, image_embeddings) -> [{label: probability}, ...]``, one dict per volume; the
    prompt embeddings are computed once per model and kept."""

    def __init__(
        self,
        labels: Sequence[str] = ABNORMALITY_LABELS,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        templates: Sequence[str] = PROMPT_TEMPLATES,
    ):
        label_prompts(labels, templates)  # checks labels and templates now rather than at the first batch
        self.labels = tuple(labels)
        self.templates = tuple(templates)
        self.logit_scale = float(logit_scale)
        self._prompts: tuple[int, torch.Tensor] | None = None  # (id of the model, embeddings)

    def prompt_embeddings(self, model) -> torch.Tensor:
        if self._prompts is None or self._prompts[0] != id(model):
            self._prompts = (id(model), embed_label_prompts(model, self.labels, self.templates))
        return self._prompts[1]

    def __call__(self, model, image_embeddings: torch.Tensor) -> list[dict[str, float]]:
        probabilities = probabilities_from_embeddings(image_embeddings, self.prompt_embeddings(model), self.logit_scale)
        return [dict(zip(self.labels, row.tolist())) for row in probabilities]


class _ModelInputs(torch.utils.data.Dataset):
    """Volumes read and prepared as the model reads them (``med3dvlm.api.model_input``), in loader workers."""

    def __init__(self, volumes: Sequence[Any], image_size, preprocessing):
        self.volumes = list(volumes)
        self.image_size = image_size
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        from med3dvlm.api import model_input

        return model_input(self.volumes[index], self.image_size, self.preprocessing)


@torch.no_grad()
def embed_volumes(
    model, volumes: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 0, progress: bool = False
) -> torch.Tensor:
    """``(N, dim)`` image embeddings as ``model.embed_images`` gives them, read by ``num_workers``
    loader processes, with a progress bar when ``progress``."""
    from tqdm.auto import tqdm

    if not volumes:
        raise ValueError("no volumes given")
    loader = torch.utils.data.DataLoader(
        _ModelInputs(volumes, model.image_size, model.preprocessing), batch_size=batch_size, num_workers=num_workers
    )
    parameter = next(model.model.image_encoder.parameters())
    chunks = []
    with tqdm(total=len(volumes), desc="embedding volumes", unit="volume", disable=not progress) as bar:
        for batch in loader:
            chunks.append(model.model.encode_image(batch.to(parameter.device, parameter.dtype)).float().cpu())
            bar.update(batch.shape[0])
    return torch.cat(chunks)


def zero_shot_probabilities(
    model,
    volumes: Sequence[Any],
    labels: Sequence[str] = ABNORMALITY_LABELS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """``(N, L)`` probability that each label is present in each volume, for a stage-1
    :class:`~med3dvlm.api.RetrievalModel`; ``volumes`` as the API takes them (paths or arrays)."""
    if getattr(model, "kind", None) != "retrieval":
        raise ValueError(
            f"zero-shot classification needs a stage-1 (SigLIP/CLIP) model, got {type(model).__name__}; "
            "load one with med3dvlm.load_model(<stage-1 export folder or checkpoint>)"
        )
    prompts = embed_label_prompts(model, labels, templates)
    images = embed_volumes(model, volumes, batch_size, num_workers, progress)
    return probabilities_from_embeddings(images, prompts, logit_scale)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def zero_shot_metrics(
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    labels: Sequence[str] = ABNORMALITY_LABELS,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Per-label and macro AUROC, F1 and accuracy (torchmetrics' binary metrics, per label column).

    A label whose targets hold one class only has no AUROC: it is ``None`` and left out of the macro
    AUROC (``macro["auroc_labels"]`` counts the labels averaged, ``macro["auroc_undefined"]`` names
    the others). F1 of a label with no positive target and no positive prediction is 0 (sklearn's
    ``zero_division=0``). Macro = the plain mean over labels."""
    from torchmetrics.functional.classification import binary_accuracy, binary_auroc, binary_f1_score

    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    targets = torch.as_tensor(targets)
    if probabilities.ndim != 2 or probabilities.shape != targets.shape or probabilities.shape[1] != len(labels):
        raise ValueError(
            f"probabilities and targets must both be (volumes, {len(labels)} labels); "
            f"got {tuple(probabilities.shape)} and {tuple(targets.shape)}"
        )
    if probabilities.shape[0] == 0:
        raise ValueError("no volumes to score")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if not ((probabilities >= 0) & (probabilities <= 1)).all():
        raise ValueError("probabilities must lie in [0, 1]")
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must be 0 or 1")
    targets = targets.long()
    per_label: dict[str, dict[str, Any]] = {}
    for column, label in enumerate(labels):
        scores, truth = probabilities[:, column], targets[:, column]
        positives = int(truth.sum())
        both_classes = 0 < positives < truth.numel()
        per_label[label] = {
            "positives": positives,
            "negatives": truth.numel() - positives,
            "auroc": float(binary_auroc(scores, truth)) if both_classes else None,
            "f1": float(binary_f1_score(scores, truth, threshold=threshold)),
            "accuracy": float(binary_accuracy(scores, truth, threshold=threshold)),
        }
    defined = [label for label in labels if per_label[label]["auroc"] is not None]
    macro = {
        "auroc": _mean([per_label[label]["auroc"] for label in defined]),
        "f1": _mean([values["f1"] for values in per_label.values()]),
        "accuracy": _mean([values["accuracy"] for values in per_label.values()]),
        "auroc_labels": len(defined),
        "auroc_undefined": [label for label in labels if label not in defined],
    }
    return {
        "num_volumes": int(probabilities.shape[0]),
        "threshold": float(threshold),
        "labels": per_label,
        "macro": macro,
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_zero_shot_table(summary: Mapping[str, Any]) -> str:
    """Markdown: a title, one row per label and the macro row, values in percent, then notes."""
    header = ["label", "positives", *(METRIC_TITLES[key] for key in METRICS)]
    split = f", {summary['split']} split" if summary.get("split") else ""
    lines = [
        f"Zero-shot abnormality classification (zero_shot), {summary['num_volumes']} volumes{split}",
        "",
        "| " + " | ".join(header) + " |",
        "|:---|" + "|".join("---:" for _ in header[1:]) + "|",
    ]
    for label, values in summary["labels"].items():
        cells = [label, f"{values['positives']}/{values['positives'] + values['negatives']}"]
        lines.append("| " + " | ".join(cells + [_percent(values[key]) for key in METRICS]) + " |")
    macro = summary["macro"]
    lines.append("| " + " | ".join(["Macro", "", *(_percent(macro[key]) for key in METRICS)]) + " |")
    notes = [f"positive when the probability is above {summary['threshold']:g} (F1, accuracy)"]
    if macro["auroc_undefined"]:
        notes.append(
            f"AUROC undefined (one class only in the targets) for {', '.join(macro['auroc_undefined'])}; "
            f"macro AUROC over the other {macro['auroc_labels']} of {len(summary['labels'])} labels"
        )
    lines += [f"\nNote: {note}" for note in notes]
    return "\n".join(lines)


# -- the evaluation run (python -m med3dvlm.eval eval=zero_shot) -----------------------------------
TASK = "zero_shot"


def run_zero_shot(
    model,
    data_root: str | Path,
    output_dir: str | Path,
    split: str = "test",
    labels: Sequence[str] = ABNORMALITY_LABELS,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    threshold: float = DEFAULT_THRESHOLD,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Classify the labelled volumes of ``split`` (``CT-RATE-labels/<split>.csv`` under ``data_root``,
    the first ``limit``), write ``zero_shot_predictions.jsonl`` (per volume: image, VolumeName,
    probabilities and targets by label), ``zero_shot_summary.json`` and ``zero_shot_table.md``; the summary."""
    from med3dvlm.data.ct_rate import labels_csv, read_abnormality_labels
    from med3dvlm.utils import write_atomic

    data_root, output_dir = Path(data_root), Path(output_dir)
    labels = tuple(labels)
    label_prompts(labels, templates)  # a bad template fails before any volume is read
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of volumes or null, got {limit}")
    volumes = read_abnormality_labels(data_root, split, labels)[:limit]
    if not volumes:
        raise ValueError(f"{labels_csv(data_root, split)} lists no volumes: nothing to classify")
    probabilities = zero_shot_probabilities(
        model, [v.image_path for v in volumes], labels, batch_size, logit_scale, templates, num_workers, progress=True
    )
    targets = torch.tensor([[v.labels[label] for label in labels] for v in volumes])
    metrics = zero_shot_metrics(probabilities, targets, labels, threshold)
    summary = {
        "task": TASK,
        **dict(source or {}),
        "data_root": str(data_root),
        "split": split,
        "prompts": {"positive": templates[0], "negative": templates[1]},
        "logit_scale": float(logit_scale),
        **metrics,
    }
    rows = [
        {
            "image": _relative(volume.image_path, data_root),
            "VolumeName": volume.volume_name,
            "probabilities": dict(zip(labels, row.tolist())),
            "targets": dict(volume.labels),
        }
        for volume, row in zip(volumes, probabilities)
    ]
    table = format_zero_shot_table(summary)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(output_dir / f"{TASK}_predictions.jsonl", lines.encode("utf-8"))
    write_atomic(
        output_dir / f"{TASK}_summary.json", (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    )
    write_atomic(output_dir / f"{TASK}_table.md", (table + "\n").encode("utf-8"))
    print(table)
    return summary


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
