"""The typed sample every reader produces and every dataset consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TASKS = ("caption", "vqa_closed", "vqa_open", "vqa_yes_no")


@dataclass(frozen=True)
class Sample:
    """One (volume, prompt, answer) triple.

    For ``caption`` the answer is the report; for VQA the prompt/answer follow SPEC §6.
    ``source`` says where the sample came from ("M3D_Cap.json:train[12]", "M3D_VQA_train.csv:row 7")
    so any later error about it can name the file and row.
    """

    image_path: Path
    prompt: str
    answer: str
    task: str
    source: str
    question_type: str | None = None  # M3D-VQA's type (Plane ..), or 3D-RAD's task
    answer_choice: str | None = None
    aspect: str | None = None  # 3D-RAD's QuestionAspect
    choices: tuple[tuple[str, str], ...] | None = None  # closed questions: (letter, text) pairs, when known
