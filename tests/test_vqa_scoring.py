"""Closed-VQA rules on hand-written outputs; per-question-type summaries against hand counts."""

from __future__ import annotations

from statistics import fmean

import pytest

from med3dvlm.evaluation.predictions import PredictionFileError
from med3dvlm.evaluation.scoring import format_summary_table, score_predictions
from med3dvlm.metrics.text import TextMetrics, rouge_f
from med3dvlm.metrics.vqa import closed_answer_is_correct, closed_vqa_accuracy, parse_choice, score_closed_answer

CHOICES = {"A": "Liver", "B": "Kidney", "C": "Spleen", "D": "Pancreas"}


@pytest.mark.parametrize(
    ("output", "letter", "correct"),
    [
        ("C. Spleen", "C", True),
        ("The answer is C.", "C", True),
        ("A. Liver B. Kidney C. Spleen", "C", True),  # the paper's rule is a substring test
        ("c. spleen", "C", False),  # the output's letter may not
        ("C", "C", False),  # no period
        ("C) Spleen", "C", False),
        ("Spleen", "C", False),
        ("CT shows the spleen", "C", False),
        ("B. Kidney", "C", False),
        ("", "A", False),
    ],
)
def test_paper_rule_on_hand_written_outputs(output, letter, correct):
    assert closed_answer_is_correct(output, letter) is correct


def test_paper_rule_rejects_a_letter_outside_a_to_d():
    with pytest.raises(ValueError, match="'E'"):
        closed_answer_is_correct("E. none", "E")


@pytest.mark.parametrize(
    ("output", "parsed"),
    [
        ("C. Spleen", "C"),
        ("The answer is C.", "C"),
        ("(B) Kidney", "B"),
        ("B) Kidney", "B"),
        ("Answer: D", "D"),
        ("A", "A"),
        ("A. Liver B. Kidney C. Spleen", None),  # names several choices: no commitment
        ("A lesion in the liver", "A"),  # no marker; the text names exactly one choice
        ("CT shows the spleen", "C"),
        ("Kidney or spleen", None),
        ("Nothing abnormal", None),
    ],
)
def test_parse_choice_on_hand_written_outputs(output, parsed):
    assert parse_choice(output, CHOICES) == parsed


def test_parse_choice_without_choice_texts_needs_a_letter():
    assert parse_choice("CT shows the spleen") is None
    assert parse_choice("spleen. C.") == "C"


def test_strict_and_paper_accuracy_differ_where_they_should():
    assert score_closed_answer("A. Liver B. Kidney C. Spleen", "C") == {
        "correct": True,
        "strict_correct": False,
        "parsed_choice": None,
    }
    assert score_closed_answer("C", "C") == {"correct": False, "strict_correct": True, "parsed_choice": "C"}
    assert score_closed_answer("Spleen", "c", CHOICES)["strict_correct"] is True


def _closed_rows() -> list[dict]:
    """Hand-written outputs; expected (paper, strict) per row in ``expected``."""
    return [
        {"question_type": 1, "answer_choice": "A", "prediction": "A. Axial", "expected": (1, 1)},
        {"question_type": "1", "answer_choice": "B", "prediction": "A. Axial", "expected": (0, 0)},
        {"question_type": "Phase", "answer_choice": "C", "prediction": "C. Arterial", "expected": (1, 1)},
        {"question_type": 3, "answer_choice": "C", "prediction": "A. x B. y C. z D. w", "expected": (1, 0)},
        {"question_type": "organ", "answer_choice": "D", "prediction": "D", "expected": (0, 1)},
        {"question_type": 5, "answer_choice": "b", "prediction": "The answer is B.", "expected": (1, 1)},
        {"question_type": "5.0", "answer_choice": "A", "prediction": "", "expected": (0, 0)},
    ]


def test_closed_summary_per_question_type_matches_hand_counts():
    rows = [dict(row, reference=f"{row['answer_choice']}. x") for row in _closed_rows()]
    per_sample, summary = score_predictions(rows)
    assert summary["task"] == "vqa_closed"
    assert [s["correct"] for s in per_sample] == [bool(r["expected"][0]) for r in rows]
    assert [s["strict_correct"] for s in per_sample] == [bool(r["expected"][1]) for r in rows]
    # Plane: rows 0-1, Phase: 2, Organ: 3-4, Location: 5-6; no Abnormality question, so no row.
    assert list(summary["by_question_type"]) == ["Plane", "Phase", "Organ", "Location"]
    expected = {"Plane": (0.5, 0.5, 2), "Phase": (1.0, 1.0, 1), "Organ": (0.5, 0.5, 2), "Location": (0.5, 0.5, 2)}
    for name, (accuracy, strict, count) in expected.items():
        values = summary["by_question_type"][name]
        assert (values["accuracy"], values["strict_accuracy"], values["count"]) == (accuracy, strict, count)
    assert summary["overall"] == {"accuracy": 4 / 7, "strict_accuracy": 4 / 7, "count": 7}

    table = format_summary_table(summary).splitlines()
    assert table[0] == "Closed-ended VQA (vqa_closed), 7 samples"
    assert table[2] == "| question type | samples | accuracy (paper rule) | strict accuracy |"
    assert table[4] == "| Plane | 2 | 50.00 | 50.00 |"
    assert table[-1] == "| Overall | 7 | 57.14 | 57.14 |"


def test_stage_3_test_report_and_the_evaluator_count_question_types_alike():
    """The stage's test report (closed_vqa_accuracy) and eval=vqa_closed (score_predictions) share one
    per-type aggregation: same types, same table order (SPEC §6, then 3D-RAD's tasks)."""
    answers = [  # (question type, prediction, answer letter)
        ("Existence Detection", "A. yes", "A"),
        ("Plane", "C. Sagittal", "C"),
        ("Medical Computation", "D. no", "B"),
        ("Plane", "A. Axial", "C"),
        ("Medical Computation", "B. 3", "B"),
    ]
    rows = [
        {"id": str(i), "question_type": kind, "prediction": prediction, "answer_choice": letter, "reference": "x"}
        for i, (kind, prediction, letter) in enumerate(answers)
    ]
    _, summary = score_predictions(rows, "vqa_closed")
    records = [{"question_type": kind, "correct": closed_answer_is_correct(p, letter)} for kind, p, letter in answers]
    stage = closed_vqa_accuracy(records)["accuracy"]
    order = ["Plane", "Medical Computation", "Existence Detection"]  # 3D-RAD task order, not sorted
    assert list(summary["by_question_type"]) == order
    assert list(stage) == [*order, "overall"]
    hand = {"Plane": (0.5, 2), "Medical Computation": (0.5, 2), "Existence Detection": (1.0, 1)}
    for name, (accuracy, count) in hand.items():
        assert stage[name] == {"accuracy": accuracy, "count": count}
        assert (summary["by_question_type"][name]["accuracy"], summary["by_question_type"][name]["count"]) == (
            accuracy,
            count,
        )
    assert stage["overall"] == {"accuracy": 0.6, "count": 5}
    assert summary["overall"]["accuracy"] == 0.6
    # the stage also scores questions of no or other types: after the known ones, sorted
    unnamed = [{"question_type": None, "correct": True}, {"question_type": "Zeta", "correct": False}]
    other = closed_vqa_accuracy([*records, *unnamed])
    assert list(other["accuracy"]) == [*order, "Unknown", "Zeta", "overall"]


def test_open_summary_averages_per_sample_library_values_per_type():
    rows = [
        {"question_type": "Organ", "prediction": "the liver", "reference": "liver"},
        {"question_type": "Organ", "prediction": "spleen", "reference": "the spleen is enlarged"},
        {"question_type": "Abnormality", "prediction": "a cyst in the kidney", "reference": "renal cyst"},
        {"question_type": "Plane", "prediction": "axial", "reference": "axial"},
    ]
    metrics = TextMetrics(bertscore=None, tokenizer="offline", wordnet="off")
    per_sample, summary = score_predictions(rows, "vqa_open", metrics)
    assert summary["metrics"] == ["bleu1", "rouge1", "rougeL", "meteor"]
    rouge1 = [rouge_f(row["prediction"], row["reference"])["rouge1"] for row in rows]
    assert [s["rouge1"] for s in per_sample] == rouge1
    assert summary["by_question_type"]["Organ"]["rouge1"] == pytest.approx(fmean(rouge1[:2]))
    assert summary["by_question_type"]["Abnormality"]["rouge1"] == pytest.approx(rouge1[2])
    assert summary["overall"]["rouge1"] == pytest.approx(fmean(rouge1))
    assert list(summary["by_question_type"]) == ["Plane", "Organ", "Abnormality"]
    assert summary["settings"]["meteor_synonyms"] is False
    table = format_summary_table(summary)
    assert "| Overall | 4 |" in table
    assert "WITHOUT WordNet" in table and "BERTScore skipped" in table


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question_type": 1}, "row 1: missing answer_choice"),
        ({"question_type": 1, "answer_choice": "E"}, "answer_choice 'E'"),
        ({"question_type": 9, "answer_choice": "A"}, "unknown 'Question Type'"),
        ({"question_type": 1, "answer_choice": "A", "reference": " "}, "row 1: empty reference"),
        ({"question_type": 1, "answer_choice": "A", "prediction": 3}, "'prediction' must be a string"),
    ],
)
def test_bad_rows_are_refused_with_the_row_named(row, message):
    with pytest.raises(PredictionFileError, match=message):
        score_predictions([{"prediction": "A.", "reference": "A. x"} | row], "vqa_closed")


def test_duplicate_ids_are_refused():
    row = {"id": "x", "prediction": "A.", "reference": "A. x", "question_type": 1, "answer_choice": "A"}
    with pytest.raises(PredictionFileError, match="row 2: id 'x' already used on row 1"):
        score_predictions([row, row], "vqa_closed")
