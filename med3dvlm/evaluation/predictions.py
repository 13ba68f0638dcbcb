"""Prediction files: JSONL, one object per sample, appended as generation goes so it can resume.

A row holds at least ``id``, ``prediction`` and ``reference``; VQA rows add ``question_type``
(``1``..``5`` or its name) and closed rows ``answer_choice`` (``A``..``D``), optionally
``choices`` (``{"A": text, ...}``). The same format is what ``eval=score`` reads, so other
systems' outputs are scored exactly as ours.

:class:`PredictionWriter` appends rows and knows which ids are done; a run killed mid-write leaves
at most a partial last line, which the next writer cuts off before appending. A sidecar
``<file>.meta.json`` records what produced the rows (model, generation settings), and a resumed
run with other settings is refused rather than mixing two models' outputs in one file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from med3dvlm.data import layout
from med3dvlm.data.m3d import parse_question_type

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa_open", "vqa_closed")
REQUIRED_FIELDS = {
    "caption": ("prediction", "reference"),
    "vqa_open": ("prediction", "reference", "question_type"),
    "vqa_closed": ("prediction", "reference", "question_type", "answer_choice"),
}
ID_FIELD = "id"


class PredictionFileError(ValueError):
    """A predictions file or one of its rows is not what scoring expects."""


def infer_task(rows: list[Mapping[str, Any]], where: str = "predictions") -> str:
    """``vqa_closed`` if rows carry ``answer_choice``, ``vqa_open`` if ``question_type``, else ``caption``."""
    if not rows:
        raise PredictionFileError(f"{where}: no rows to score")
    first = rows[0]
    if first.get("answer_choice") not in (None, ""):
        return "vqa_closed"
    if first.get("question_type") not in (None, ""):
        return "vqa_open"
    return "caption"


def validate_rows(rows: list[dict[str, Any]], task: str, where: str = "predictions") -> list[dict[str, Any]]:
    """Check every row for ``task`` and normalise it; errors name the file and row.

    Missing ids become the 1-based row number. Question types become their SPEC §6 names,
    answer letters upper case. Predictions may be empty (a model can say nothing); references may not.
    """
    if task not in TASKS:
        raise PredictionFileError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not rows:
        raise PredictionFileError(f"{where}: no rows to score")
    seen: dict[str, int] = {}  # id -> row number
    checked = []
    for number, row in enumerate(rows, start=1):
        at = f"{where}: row {number}"
        missing = [name for name in REQUIRED_FIELDS[task] if row.get(name) is None]
        if missing:
            raise PredictionFileError(
                f"{at}: missing {', '.join(missing)}; a {task} row needs {', '.join(REQUIRED_FIELDS[task])}"
            )
        row = dict(row)
        for name in ("prediction", "reference"):
            if not isinstance(row[name], str):
                raise PredictionFileError(f"{at}: {name!r} must be a string, got {type(row[name]).__name__}")
        if not row["reference"].strip():
            raise PredictionFileError(f"{at}: empty reference; every sample needs a reference text")
        row[ID_FIELD] = str(row.get(ID_FIELD, number))
        if row[ID_FIELD] in seen:
            raise PredictionFileError(f"{at}: id {row[ID_FIELD]!r} already used on row {seen[row[ID_FIELD]]}")
        seen[row[ID_FIELD]] = number
        if task != "caption":
            try:
                row["question_type"] = parse_question_type(str(row["question_type"]), at)
            except ValueError as error:
                raise PredictionFileError(str(error)) from error
        if task == "vqa_closed":
            letter = str(row["answer_choice"]).strip().upper()
            if letter not in layout.ANSWER_LETTERS:
                raise PredictionFileError(
                    f"{at}: answer_choice {row['answer_choice']!r} is not one of {', '.join(layout.ANSWER_LETTERS)}"
                )
            row["answer_choice"] = letter
        checked.append(row)
    return checked


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a JSONL file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PredictionFileError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise PredictionFileError(f"{path}: line {line_number} is not a JSON object")
            rows.append(row)
    return rows


def read_predictions(path: str | os.PathLike, task: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows of a predictions file, checked, and their task (inferred when ``task`` is None)."""
    rows = read_jsonl(path)
    task = task or infer_task(rows, str(path))
    return validate_rows(rows, task, str(path)), task


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows at once, through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


class PredictionWriter:
    """Appends prediction rows keyed by ``id``; :attr:`done_ids` says what a resumed run can skip.

    ``settings`` (JSON-able) describe what produced the rows; they are stored beside the file on
    first use and must match on every later use.
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_settings(dict(settings or {}))
        self._cut_partial_last_line()
        self.done_ids: set[str] = set()
        if self.path.exists():
            for line_number, row in enumerate(read_jsonl(self.path), start=1):
                if ID_FIELD not in row:
                    raise PredictionFileError(f"{self.path}: row {line_number} has no {ID_FIELD!r}")
                self.done_ids.add(str(row[ID_FIELD]))
        if self.done_ids:
            log.info("resuming: %d samples already in %s", len(self.done_ids), self.path)

    def _check_settings(self, settings: dict[str, Any]) -> None:
        canonical = json.loads(json.dumps(settings))
        if self.meta_path.exists():
            recorded = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if recorded != canonical:
                changed = sorted(k for k in set(recorded) | set(canonical) if recorded.get(k) != canonical.get(k))
                raise PredictionFileError(
                    f"{self.path} holds predictions made with other settings ({', '.join(changed)} differ, "
                    f"see {self.meta_path}); resume with the same settings, or write to a new output folder"
                )
        elif self.path.exists() and self.path.stat().st_size:
            raise PredictionFileError(
                f"{self.path} exists without {self.meta_path.name}, so it cannot be resumed safely; "
                "move it away or write to a new output folder"
            )
        else:
            self.meta_path.write_text(json.dumps(canonical, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _cut_partial_last_line(self) -> None:
        if not self.path.exists() or not self.path.stat().st_size:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s ends with a partial row (an interrupted write); dropping it", self.path)
        with self.path.open("r+b") as handle:
            handle.truncate(keep)

    def is_done(self, sample_id: str) -> bool:
        return str(sample_id) in self.done_ids

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows (one batch) and flush them to disk before returning."""
        rows = [dict(row) for row in rows]
        ids = [str(row[ID_FIELD]) for row in rows]
        repeated = sorted({i for i in ids if i in self.done_ids or ids.count(i) > 1})
        if repeated:
            raise PredictionFileError(f"{self.path}: samples {', '.join(repeated)} are already written")
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        with self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        self.done_ids.update(ids)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path) if self.path.exists() else []
