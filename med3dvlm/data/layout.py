"""File names, column names and prompt formats of the M3D-Cap / M3D-VQA layout (SPEC §6).

Everything that reads or writes a dataset root (readers, phantom generator, preparation,
checker) takes these names from here so the layout is defined once.
"""

from __future__ import annotations

import re
import string

# M3D-Cap: one JSON at the data root, {"train"|"validation"|"test": [{"image": REL, "text": REL}]}.
CAP_JSON = "M3D_Cap.json"
CAP_SPLITS = ("train", "validation", "test")

# M3D-VQA: CSVs in a sub-folder of the data root; image paths in them are relative to the root.
VQA_DIR = "M3D-VQA"
VQA_CSV = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"}
VQA_YN_CSV = {
    "train": "M3D_VQA_yn_train.csv",
    "validation": "M3D_VQA_yn_val.csv",
    "test": "M3D_VQA_yn_test.csv",
}
# Columns of the closed/open CSVs (SPEC §6). One row serves both a closed and an open question.
VQA_COLUMNS = (
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)
# Columns of the yes/no CSVs; "Answer" is "Yes" or "No".
VQA_YN_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Answer")

# SPEC §6: question types 1..5.
QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
# 3D-RAD's six tasks (task1 .. task6): the question type of its questions (med3dvlm.data.rad3d).
RAD3D_TASKS = {
    1: "Anomaly Detection",
    2: "Image Observation",
    3: "Medical Computation",
    4: "Existence Detection",
    5: "Static Temporal Diagnosis",
    6: "Longitudinal Temporal Diagnosis",
}
# Every question type a sample may carry, in table order: M3D-VQA's, then 3D-RAD's tasks.
ALL_QUESTION_TYPES = (*QUESTION_TYPES.values(), *RAD3D_TASKS.values())
ANSWER_LETTERS = ("A", "B", "C", "D")
YES_NO_ANSWERS = ("Yes", "No")

# Volume file suffixes the readers understand.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy")


def closed_prompt(question: str, choices: dict[str, str]) -> str:
    """SPEC §6: the question, a space, then ``Choices: A. {a} B. {b} C. {c} D. {d}``."""
    options = " ".join(f"{letter}. {choices[letter]}" for letter in ANSWER_LETTERS)
    return f"{question} Choices: {options}"


_CLOSED_PROMPT = re.compile(r"(.*) Choices: A\. (.*?) B\. (.*?) C\. (.*?) D\. (.*)", re.DOTALL)


def split_closed_prompt(prompt: str) -> tuple[str, list[str]]:
    """The inverse of :func:`closed_prompt`: ``(question, [choice A, B, C, D])``."""
    match = _CLOSED_PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a closed-ended prompt (question + 'Choices: A. .. B. .. C. .. D. ..'): {prompt!r}")
    return match.group(1), list(match.group(2, 3, 4, 5))


# SPEC §6: the closed-ended answer, letter first.
CLOSED_ANSWER_FORMAT = "{letter}. {answer}"


def closed_answer(letter: str, answer: str, template: str = CLOSED_ANSWER_FORMAT) -> str:
    """The closed-ended answer: SPEC §6's ``"{letter}. {answer}"``, or another ``template`` with
    the same two fields (see :func:`check_closed_answer_format`)."""
    return template.format(letter=letter, answer=answer)


def check_closed_answer_format(template: str) -> str:
    """A closed-answer template must hold ``{letter}`` followed by a period (what SPEC §7's rule
    scores) and ``{answer}``, each once, and no other field."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"closed answer format {template!r} is not a format string: {exc}") from exc
    if sorted(fields) != ["answer", "letter"] or "{letter}." not in template:
        raise ValueError(
            f"closed answer format {template!r} must contain '{{letter}}.' (the paper's scoring looks for the "
            "letter and a period) and '{answer}', each once, and no other field"
        )
    return template


# Prompt for report generation. The SPEC gives none; M3D-style, one fixed instruction.
CAPTION_PROMPT = "Describe the findings of this medical image."
