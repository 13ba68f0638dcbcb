"""Readers of the M3D-Cap JSON and M3D-VQA CSVs (SPEC §6), producing ``Sample``s.

The readers check each record (fields present and valid, image path inside the data root, image
file present, report non-empty) but do not decode volumes, so reading stays fast on the full
120k-volume dataset; ``load_volume`` checks the volume itself when a sample is used.

Bad records: with ``on_bad_sample="error"`` (default) the first one raises a ``DataError`` naming
the file and the JSON entry or CSV row. With ``"skip"`` the record is left out, listed in
``ReadResult.skipped`` and counted in one warning per file; no other sample takes its place.
Problems with the file as a whole (missing, malformed, no such split, missing columns) always raise.

``volume_format`` (``nii.gz``, ``nii``, ``npy``; None = as listed) makes a sample's image the sibling
file of that format, e.g. the fast uncompressed ``x.nii`` of a listed ``x.nii.gz`` (``volumes.py``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Literal

from med3dvlm.data import layout
from med3dvlm.data.errors import (
    CorruptFileError,
    DataError,
    InvalidRecordError,
    MissingColumnsError,
    MissingFileError,
    UnknownFormatError,
    UnsafePathError,
)
from med3dvlm.data.samples import TASKS, Sample
from med3dvlm.data.volumes import with_volume_format

logger = logging.getLogger(__name__)

OnBadSample = Literal["error", "skip"]
ON_BAD_SAMPLE_CHOICES = ("error", "skip")
VQA_MODES = ("closed", "open")


@dataclass(frozen=True)
class SkippedSample:
    """A record left out in ``on_bad_sample="skip"`` mode, and why."""

    source: str
    reason: str


@dataclass
class ReadResult:
    """What a reader returns: the valid samples, in file order, and the records it skipped."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[SkippedSample] = field(default_factory=list)


def check_on_bad_sample(on_bad_sample: str) -> None:
    """Reject a misspelt policy early instead of silently treating it as one of the two."""
    if on_bad_sample not in ON_BAD_SAMPLE_CHOICES:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE_CHOICES}, got {on_bad_sample!r}")


def fold_newlines(text: str) -> str:
    """Strip a report and join its non-blank lines with single spaces (SPEC §6: newlines folded)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def resolve_in_root(root: Path, relative: str, where: str, what: str = "image") -> Path:
    """``root / relative``, refusing paths that are absolute or climb out of ``root`` with ``..``.

    The check is on the path text, not on resolved symlinks, so a root whose folders link to
    storage elsewhere still works.
    """
    relative = relative.strip()
    if not relative:
        raise InvalidRecordError(f"{where}: empty {what} path")
    if os.path.isabs(relative) or PureWindowsPath(relative).drive or relative.startswith(("/", "\\")):
        raise UnsafePathError(
            f"{where}: {what} path {relative!r} is absolute; paths must be relative to the data root {root}"
        )
    normal = os.path.normpath(relative)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise UnsafePathError(f"{where}: {what} path {relative!r} points outside the data root {root}")
    return root / normal


class _FileExistence:
    """Checks that referenced files exist, asking the file system once per path."""

    def __init__(self, volume_format: str | None = None) -> None:
        self._seen: set[Path] = set()
        self.volume_format = volume_format
        with_volume_format("volume.nii.gz", volume_format)  # reject a misspelt format before any row

    def volume(self, listed: Path, where: str) -> Path:
        """The file read for a listed image under ``volume_format``, which must exist."""
        try:
            path = with_volume_format(listed, self.volume_format)
        except UnknownFormatError as exc:
            raise UnknownFormatError(f"{where}: {exc}") from exc
        if path != listed and path not in self._seen and not path.is_file():
            raise MissingFileError(
                f"{where}: image file {path} not found: volume_format={self.volume_format} reads it "
                f"in place of the listed {listed}; write such copies with "
                "`python -m med3dvlm.prepare convert=<data root>`"
            )
        self.require(path, where, "image")
        return path

    def require(self, path: Path, where: str, what: str) -> None:
        if path in self._seen:
            return
        if not path.is_file():
            raise MissingFileError(f"{where}: {what} file {path} not found")
        self._seen.add(path)


class _SampleCollector:
    """Applies the ``on_bad_sample`` policy to records read from one file."""

    def __init__(self, file: Path, on_bad_sample: str) -> None:
        check_on_bad_sample(on_bad_sample)
        self.file = file
        self.on_bad_sample = on_bad_sample
        self.result = ReadResult()

    def add(self, source: str, build: Callable[..., Sample], *args: object) -> None:
        """Keep ``build(*args)``, or record why it failed when skipping."""
        try:
            sample = build(*args)
        except DataError as exc:
            if self.on_bad_sample == "error":
                raise
            self.result.skipped.append(SkippedSample(source=source, reason=str(exc)))
            return
        self.result.samples.append(sample)

    def finish(self) -> ReadResult:
        skipped = self.result.skipped
        if skipped:
            total = len(skipped) + len(self.result.samples)
            logger.warning(
                "%s: skipped %d bad sample(s) of %d; first: %s", self.file, len(skipped), total, skipped[0].reason
            )
        return self.result


# --------------------------------------------------------------------------------------------
# M3D-Cap
# --------------------------------------------------------------------------------------------


def read_cap_json(
    root: str | os.PathLike, split: str, on_bad_sample: OnBadSample = "error", volume_format: str | None = None
) -> ReadResult:
    """Image-report pairs of one split of ``root/M3D_Cap.json`` as ``caption`` samples."""
    root = Path(root)
    json_path = root / layout.CAP_JSON
    existence = _FileExistence(volume_format)
    entries = _load_cap_split(json_path, split)
    collector = _SampleCollector(json_path, on_bad_sample)
    for index, entry in enumerate(entries):
        where = f"{json_path}: {split}[{index}]"
        source = f"{json_path.name}:{split}[{index}]"
        collector.add(source, _cap_sample, root, entry, where, source, existence)
    return collector.finish()


def _load_cap_split(json_path: Path, split: str) -> list:
    if not json_path.is_file():
        raise MissingFileError(f"{json_path}: M3D-Cap JSON not found")
    try:
        with json_path.open(encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            f"{json_path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{json_path}: not UTF-8 text ({exc})") from exc
    if not isinstance(content, dict):
        raise CorruptFileError(f"{json_path}: expected an object with keys {layout.CAP_SPLITS}")
    if split not in content:
        raise InvalidRecordError(f"{json_path}: no split {split!r}; the file has {sorted(content)}")
    entries = content[split]
    if not isinstance(entries, list):
        raise CorruptFileError(f"{json_path}: split {split!r} is not a list of entries")
    return entries


def _cap_sample(root: Path, entry: object, where: str, source: str, existence: _FileExistence) -> Sample:
    if not isinstance(entry, dict):
        raise InvalidRecordError(f"{where}: expected an object with keys 'image' and 'text'")
    missing = [key for key in ("image", "text") if not isinstance(entry.get(key), str)]
    if missing:
        raise InvalidRecordError(f"{where}: entry lacks string field(s) {missing}")
    image_path = resolve_in_root(root, entry["image"], where, "image")
    report_path = resolve_in_root(root, entry["text"], where, "report")
    report = _read_report(report_path, where)
    image_path = existence.volume(image_path, where)
    return Sample(image_path=image_path, prompt=layout.CAPTION_PROMPT, answer=report, task="caption", source=source)


def _read_report(report_path: Path, where: str) -> str:
    if not report_path.is_file():
        raise MissingFileError(f"{where}: report file {report_path} not found")
    try:
        text = report_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{where}: report file {report_path} is not UTF-8 text ({exc})") from exc
    report = fold_newlines(text)
    if not report:
        raise InvalidRecordError(f"{where}: report file {report_path} is empty")
    return report


# --------------------------------------------------------------------------------------------
# M3D-VQA
# --------------------------------------------------------------------------------------------


def read_vqa_csv(
    path: str | os.PathLike,
    root: str | os.PathLike,
    mode: Literal["closed", "open"] = "closed",
    on_bad_sample: OnBadSample = "error",
    volume_format: str | None = None,
    closed_answer_format: str = layout.CLOSED_ANSWER_FORMAT,
) -> ReadResult:
    """Closed- or open-ended VQA samples of one M3D-VQA CSV; image paths are relative to ``root``.

    closed: prompt = question + `` Choices: A. .. B. .. C. .. D. ..``, answer = ``"{letter}. {Answer}"``
    (or ``closed_answer_format``, see ``layout.check_closed_answer_format``);
    open: prompt = question, answer = ``Answer`` (SPEC §6).
    """
    if mode not in VQA_MODES:
        raise ValueError(f"mode must be one of {VQA_MODES}, got {mode!r}")
    path, root = Path(path), Path(root)
    collector = _SampleCollector(path, on_bad_sample)
    existence = _FileExistence(volume_format)
    for row_number, header, fields in _read_csv_rows(path, layout.VQA_COLUMNS):
        where = f"{path}: row {row_number}"
        source = f"{path.name}:row {row_number}"
        collector.add(
            source, _vqa_sample, root, header, fields, mode, where, source, existence, closed_answer_format
        )
    return collector.finish()


def read_vqa_yes_no_csv(
    path: str | os.PathLike,
    root: str | os.PathLike,
    on_bad_sample: OnBadSample = "error",
    volume_format: str | None = None,
) -> ReadResult:
    """Yes/no VQA samples of one ``M3D_VQA_yn_*.csv``: prompt = question, answer ``"Yes"``/``"No"``."""
    path, root = Path(path), Path(root)
    collector = _SampleCollector(path, on_bad_sample)
    existence = _FileExistence(volume_format)
    for row_number, header, fields in _read_csv_rows(path, layout.VQA_YN_COLUMNS):
        where = f"{path}: row {row_number}"
        source = f"{path.name}:row {row_number}"
        collector.add(source, _yes_no_sample, root, header, fields, where, source, existence)
    return collector.finish()


def _read_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, list[str], list[str]]]:
    """Rows as ``(row number, header, fields)``; the caller checks each row under its policy.

    Row numbers count the header as row 1, as a spreadsheet shows them. Blank lines are skipped.
    """
    if not path.is_file():
        raise MissingFileError(f"{path}: CSV file not found")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        records = csv.reader(handle)
        row_number = 1
        try:
            header = [name.strip() for name in next(records, [])]
            missing = [column for column in required if column not in header]
            if missing:
                raise MissingColumnsError(
                    f"{path}: row 1 (header) lacks column(s) {missing}; expected {list(required)}"
                )
            for fields in records:
                row_number += 1
                if fields:
                    yield row_number, header, fields
        except csv.Error as exc:
            raise CorruptFileError(f"{path}: row {row_number + 1}: malformed CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise CorruptFileError(f"{path}: not UTF-8 text ({exc})") from exc


def _row_values(header: list[str], fields: list[str], where: str) -> dict[str, str]:
    """``{column: stripped text}``; a field count unlike the header's is usually an unquoted comma."""
    if len(fields) != len(header):
        raise InvalidRecordError(f"{where}: row has {len(fields)} fields but the header has {len(header)}")
    return {name: value.strip() for name, value in zip(header, fields)}


def _required_text(row: dict[str, str], column: str, where: str) -> str:
    value = row[column]
    if not value:
        raise InvalidRecordError(f"{where}: empty {column!r}")
    return value


def parse_question_type(value: str, where: str) -> str:
    """The question type name for a CSV value: ``1``..``5`` (also ``"1.0"``) or the name itself."""
    text = value.strip()
    by_name = {name.lower(): name for name in layout.ALL_QUESTION_TYPES}  # M3D's types and 3D-RAD's tasks
    if text.lower() in by_name:
        return by_name[text.lower()]
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and number.is_integer() and int(number) in layout.QUESTION_TYPES:
        return layout.QUESTION_TYPES[int(number)]
    allowed = ", ".join(f"{key} {name}" for key, name in layout.QUESTION_TYPES.items())
    raise InvalidRecordError(f"{where}: unknown 'Question Type' {value!r}; expected one of {allowed}")


def _vqa_sample(
    root: Path,
    header: list[str],
    fields: list[str],
    mode: str,
    where: str,
    source: str,
    existence: _FileExistence,
    closed_answer_format: str = layout.CLOSED_ANSWER_FORMAT,
) -> Sample:
    row = _row_values(header, fields, where)
    question = _required_text(row, "Question", where)
    answer_text = _required_text(row, "Answer", where)
    question_type = parse_question_type(row["Question Type"], where)
    if mode == "closed":
        letter = row["Answer Choice"].upper()
        if letter not in layout.ANSWER_LETTERS:
            raise InvalidRecordError(
                f"{where}: 'Answer Choice' is {row['Answer Choice']!r}; expected one of {layout.ANSWER_LETTERS}"
            )
        choices = {letter_: row[f"Choice {letter_}"] for letter_ in layout.ANSWER_LETTERS}
        prompt = layout.closed_prompt(question, choices)
        answer = layout.closed_answer(letter, answer_text, closed_answer_format)
        task, answer_choice = "vqa_closed", letter
    else:
        # Open-ended questions have no choices; the letter column is not needed.
        prompt, answer, task, answer_choice = question, answer_text, "vqa_open", None
    image_path = resolve_in_root(root, row["Image Path"], where, "image")
    image_path = existence.volume(image_path, where)
    return Sample(
        image_path=image_path,
        prompt=prompt,
        answer=answer,
        task=task,
        source=source,
        question_type=question_type,
        answer_choice=answer_choice,
    )


def _yes_no_sample(
    root: Path, header: list[str], fields: list[str], where: str, source: str, existence: _FileExistence
) -> Sample:
    row = _row_values(header, fields, where)
    question = _required_text(row, "Question", where)
    answer_text = _required_text(row, "Answer", where)
    answers = {answer.lower(): answer for answer in layout.YES_NO_ANSWERS}
    if answer_text.lower() not in answers:
        raise InvalidRecordError(f"{where}: 'Answer' is {answer_text!r}; expected Yes or No")
    question_type = parse_question_type(row["Question Type"], where)
    image_path = resolve_in_root(root, row["Image Path"], where, "image")
    image_path = existence.volume(image_path, where)
    return Sample(
        image_path=image_path,
        prompt=question,
        answer=answers[answer_text.lower()],
        task="vqa_yes_no",
        source=source,
        question_type=question_type,
    )


# --------------------------------------------------------------------------------------------
# One entry point per (task, split), for the DataModules
# --------------------------------------------------------------------------------------------
