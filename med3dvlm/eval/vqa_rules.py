"""Scoring rules of the paper's VQA evaluation (SPEC §7)."""

from __future__ import annotations

from med3dvlm.data.layout import ANSWER_LETTERS


def closed_answer_is_correct(prediction: str, letter: str) -> bool:
    """SPEC §7: a closed-ended answer is correct when the prediction contains the answer letter
    followed by a period, e.g. ``"C."`` in ``"C. Sagittal"`` (case-sensitive, anywhere in the text)."""
    letter = letter.strip()
    if letter not in ANSWER_LETTERS:
        raise ValueError(f"answer letter must be one of {ANSWER_LETTERS}, got {letter!r}")
    return f"{letter}." in prediction
