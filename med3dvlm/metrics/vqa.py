"""Closed-ended VQA scoring (SPEC §7): the paper's rule, a strict accuracy on the parsed choice,
and the means per question type that every table reports.

The paper's rule (:func:`closed_answer_is_correct`) accepts any output that contains ``"C."`` for
answer C, so an output listing every choice ("A. x B. y C. z D. w") is counted correct. The strict
accuracy beside it first parses the *one* choice the output commits to (:func:`parse_choice`) and
counts it correct only when that is the answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from statistics import fmean
from typing import Any

from med3dvlm.data import layout

# Closed VQA has four choices (SPEC §6): the accuracy of guessing.
CLOSED_VQA_CHANCE = 0.25
# The question type of a sample that carries none.
UNKNOWN_QUESTION_TYPE = "Unknown"
# A choice letter standing alone ("C.", "C)", "(C)", "C:") or the whole output ("C").
_LETTER_MARKER = re.compile(r"(?<![A-Za-z0-9])\(?([A-D])(?:[.):]|$)")


def closed_answer_is_correct(prediction: str, letter: str) -> bool:
    """SPEC §7: a closed-ended answer is correct when the prediction contains the answer letter
    followed by a period, e.g. ``"C."`` in ``"C. Sagittal"`` (case-sensitive, anywhere in the text)."""
    letter = letter.strip()
    if letter not in layout.ANSWER_LETTERS:
        raise ValueError(f"answer letter must be one of {layout.ANSWER_LETTERS}, got {letter!r}")
    return f"{letter}." in prediction


def parse_choice(prediction: str, choices: Mapping[str, str] | None = None) -> str | None:
    """The single choice letter an output names, or ``None`` when it names none or several.

    Letters count as markers (``"C."``, ``"C)"``, ``"(C)"``, ``"C:"`` or a bare ``"C"`` output),
    never inside words. An output with no marker is matched against the choice texts, when given:
    exactly one choice text (whole words, any case) must occur in it.
    """
    text = prediction.strip()
    letters = {match.group(1) for match in _LETTER_MARKER.finditer(text)}
    if len(letters) == 1:
        return letters.pop()
    if letters or not choices:
        return None
    named = {
        letter
        for letter, choice in choices.items()
        if choice.strip() and re.search(rf"(?<!\w){re.escape(choice.strip())}(?!\w)", text, flags=re.IGNORECASE)
    }
    return named.pop() if len(named) == 1 else None


def score_closed_answer(
    prediction: str, answer_choice: str, choices: Mapping[str, str] | None = None
) -> dict[str, object]:
    """Per-sample scores: ``correct`` (paper's rule), ``strict_correct`` and ``parsed_choice``."""
    letter = answer_choice.strip().upper()
    parsed = parse_choice(prediction, choices)
    return {
        "correct": closed_answer_is_correct(prediction, letter),
        "strict_correct": parsed == letter,
        "parsed_choice": parsed,
    }


# -- means over samples, overall and per question type ---------------------------------------------
def question_type_order(names: Collection[str]) -> list[str]:
    """Question types in table order: SPEC §6's (Plane .. Location), then 3D-RAD's tasks, then any other
    name (sorted), so no type is left out of a table."""
    known = [name for name in layout.ALL_QUESTION_TYPES if name in names]
    return known + sorted(name for name in set(names) if name not in layout.ALL_QUESTION_TYPES)


def mean_scores(per_sample: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """The mean of each score in ``keys`` over the samples (NaN when there are none), and ``count``."""
    means = {key: fmean(float(scores[key]) for scores in per_sample) if per_sample else math.nan for key in keys}
    return means | {"count": len(per_sample)}


def means_by_group(
    per_sample: Sequence[Mapping[str, float]], groups: Sequence[str], keys: Sequence[str], order: Sequence[str]
) -> dict[str, dict[str, float]]:
    """:func:`mean_scores` of each group's samples (``groups[i]`` is sample i's), groups in ``order``."""
    return {name: mean_scores([s for s, group in zip(per_sample, groups) if group == name], keys) for name in order}


def means_by_question_type(
    per_sample: Sequence[Mapping[str, float]], question_types: Sequence[str], keys: Sequence[str]
) -> dict[str, dict[str, float]]:
    """:func:`mean_scores` per question type, in table order (:func:`question_type_order`)."""
    return means_by_group(per_sample, question_types, keys, question_type_order(set(question_types)))


def closed_vqa_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The paper's accuracy per question type (table order) and overall, from records holding
    ``question_type`` and ``correct``; with the chance level and the records themselves."""
    correct = [{"accuracy": float(bool(record["correct"]))} for record in records]
    types = [record["question_type"] or UNKNOWN_QUESTION_TYPE for record in records]
    accuracy = means_by_question_type(correct, types, ("accuracy",))
    accuracy["overall"] = mean_scores(correct, ("accuracy",))
    return {"chance": CLOSED_VQA_CHANCE, "accuracy": accuracy, "predictions": list(records)}


def format_closed_vqa_table(results: Mapping[str, Any]) -> str:
    """Markdown table of :func:`closed_vqa_accuracy`, accuracies in percent."""
    rule = "paper's rule: the answer letter followed by a period"
    lines = [
        f"Closed-ended VQA accuracy ({rule}; chance {results['chance']:.0%})",
        "",
        "| question type | accuracy (%) | questions |",
        "|---|---|---|",
    ]
    for name, row in results["accuracy"].items():
        lines.append(f"| {name} | {100 * row['accuracy']:.2f} | {row['count']} |")
    return "\n".join(lines)
