"""3D-RAD questions of a prepared CT-RATE root (``3D-RAD/<split>/task<N>_{closed,open}.csv``, written
by ``python -m med3dvlm.prepare source=ct_rate``) as the same :class:`Sample` the M3D readers give.

Closed questions have two or four choices and are prompted as 3D-RAD does: the question, a newline,
``Choices: A. .. B. ..``, a newline, ``Answer:``; their answer is the letter and the choice text (the
data config's ``closed_answer_format``), scored like M3D-VQA by the letter and a period. Open ones:
the question and the answer text. ``question_type`` is the 3D-RAD task ("Anomaly Detection", ...),
``aspect`` its ``QuestionAspect``, so evaluation tables go by task and by aspect.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.ct_rate import RAD3D_COLUMNS, RAD3D_DIR, RAD3D_TASKS
from med3dvlm.data.errors import InvalidRecordError
from med3dvlm.data.m3d import (
    OnBadSample,
    ReadResult,
    _FileExistence,
    _read_csv_rows,
    _required_text,
    _row_values,
    _SampleCollector,
    resolve_in_root,
)
from med3dvlm.data.samples import Sample

logger = logging.getLogger(__name__)
RAD3D_TASK_NAMES = tuple(RAD3D_TASKS.values())


def is_rad3d_root(root: str | os.PathLike) -> bool:
    """A root whose VQA is 3D-RAD: it has ``3D-RAD/`` and no ``M3D-VQA/``."""
    root = Path(root)
    return (root / RAD3D_DIR).is_dir() and not (root / layout.VQA_DIR).is_dir()


def rad3d_closed_prompt(question: str, choices: dict[str, str]) -> str:
    """3D-RAD's closed prompt: question, newline, ``Choices: A. .. B. ..``, newline, ``Answer:``."""
    options = " ".join(f"{letter}. {text}" for letter, text in choices.items())
    return f"{question}\nChoices: {options}\nAnswer:"


def read_rad3d_split(
    root: str | os.PathLike,
    task: str,
    split: str,
    on_bad_sample: OnBadSample = "error",
    volume_format: str | None = None,
    closed_answer_format: str = layout.CLOSED_ANSWER_FORMAT,
) -> ReadResult:
    """The ``vqa_closed`` or ``vqa_open`` samples of every 3D-RAD task CSV of ``split`` (task order).

    ``vqa_yes_no``: 3D-RAD has no yes/no set (its yes/no questions are two-choice closed ones), so none."""
    root = Path(root)
    if task == "vqa_yes_no":
        logger.info("%s: 3D-RAD has no yes/no set; its yes/no questions are two-choice questions in vqa_closed", root)
        return ReadResult()
    if task not in ("vqa_closed", "vqa_open"):
        raise ValueError(f"3D-RAD holds vqa_closed and vqa_open questions, not {task!r}")
    kind = task.removeprefix("vqa_")
    result = ReadResult()
    for number in RAD3D_TASKS:
        path = root / RAD3D_DIR / split / f"task{number}_{kind}.csv"
        if not path.is_file():
            continue
        part = read_rad3d_csv(path, root, on_bad_sample, volume_format, closed_answer_format)
        result.samples += part.samples
        result.skipped += part.skipped
    return result


def read_rad3d_csv(
    path: str | os.PathLike,
    root: str | os.PathLike,
    on_bad_sample: OnBadSample = "error",
    volume_format: str | None = None,
    closed_answer_format: str = layout.CLOSED_ANSWER_FORMAT,
) -> ReadResult:
    """One prepared 3D-RAD CSV; closed when its name says ``_closed``. Errors name the file and row."""
    path, root = Path(path), Path(root)
    closed = path.stem.endswith("_closed")
    collector = _SampleCollector(path, on_bad_sample)
    existence = _FileExistence(volume_format)
    for row_number, header, fields in _read_csv_rows(path, RAD3D_COLUMNS):
        where, source = f"{path}: row {row_number}", f"{path.parent.name}/{path.name}:row {row_number}"
        collector.add(source, _sample, root, header, fields, closed, where, source, existence, closed_answer_format)
    return collector.finish()


def _sample(root, header, fields, closed, where, source, existence, closed_answer_format) -> Sample:
    row = _row_values(header, fields, where)
    question = _required_text(row, "Question", where)
    answer_text = _required_text(row, "Answer", where)
    task = row["Task"]
    if task not in RAD3D_TASK_NAMES:
        raise InvalidRecordError(f"{where}: unknown 3D-RAD Task {task!r}; expected one of {list(RAD3D_TASK_NAMES)}")
    image = existence.volume(resolve_in_root(root, row["Image Path"], where, "image"), where)
    aspect = row["QuestionAspect"] or None
    if not closed:
        return Sample(image, question, answer_text, "vqa_open", source, question_type=task, aspect=aspect)
    choices = {letter: row[f"Choice {letter}"] for letter in layout.ANSWER_LETTERS if row[f"Choice {letter}"]}
    if list(choices) not in (["A", "B"], ["A", "B", "C", "D"]):
        raise InvalidRecordError(f"{where}: choices {list(choices)}; a closed question has A-B or A-D")
    letter = row["AnswerChoice"].upper()
    if letter not in choices:
        raise InvalidRecordError(f"{where}: 'AnswerChoice' is {row['AnswerChoice']!r}; expected one of {list(choices)}")
    return Sample(
        image,
        rad3d_closed_prompt(question, choices),
        layout.closed_answer(letter, answer_text, closed_answer_format),
        "vqa_closed",
        source,
        question_type=task,
        answer_choice=letter,
        aspect=aspect,
        choices=tuple(choices.items()),
    )
