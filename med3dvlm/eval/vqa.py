"""Closed-ended VQA scoring: the paper's accuracy and a strict accuracy on the parsed choice.

The paper's rule (:func:`~med3dvlm.eval.vqa_rules.closed_answer_is_correct`) accepts any output
that contains ``"C."`` for answer C, so an output listing every choice ("A. x B. y C. z D. w") is
counted correct. The strict accuracy beside it first parses the *one* choice the output commits to
(:func:`parse_choice`) and counts it correct only when that is the answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from med3dvlm.data import layout
from med3dvlm.eval.vqa_rules import closed_answer_is_correct

# A choice letter standing alone ("C.", "C)", "(C)", "C:") or the whole output ("C").
_LETTER_MARKER = re.compile(r"(?<![A-Za-z0-9])\(?([A-D])(?:[.):]|$)")


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


def question_type_order(names: set[str]) -> list[str]:
    """Question types in table order: SPEC §6's (Plane .. Location), then 3D-RAD's tasks, then any other
    name (sorted), so no type is left out of a table."""
    known = [name for name in layout.ALL_QUESTION_TYPES if name in names]
    return known + sorted(name for name in names if name not in layout.ALL_QUESTION_TYPES)
