"""What ``predict`` runs over: the volumes of ``inputs=`` and the questions of ``task=answer``.

``inputs=`` is one of

* a **folder**, searched recursively: every NIfTI / ``.npy`` file, every ``.zip`` and every DICOM
  series folder (a folder holding DICOM files directly, a ``DICOMDIR`` index aside, is one input,
  sub-folders and all, as ``load_ct`` reads it; its sub-folders are not searched again);
* a **list**: a ``.txt`` file, one path per line (blank lines and ``#`` comments skipped), or a
  ``.csv`` file with a column of paths (``input_column``, default ``path``); relative paths are
  relative to the list's folder. A listed folder is one input (a DICOM series);
* a **glob** (``/scans/**/*.nii.gz``; ``**`` crosses folders): every match is one input;
* a single file or DICOM folder.

Inputs are identified by their absolute path (symlinks kept), in sorted order for a folder or a glob
and in file order for a list; an input named twice counts once. A listed path that does not exist
is not an error here: it becomes a bad input of the run, reported with the rest.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from med3dvlm.data.ct import DICOM_MAGIC, DICOM_MAGIC_OFFSET, ZIP_SUFFIX
from med3dvlm.data.layout import ANSWER_LETTERS, CAPTION_PROMPT, VOLUME_SUFFIXES

LIST_SUFFIXES = (".txt", ".csv")
GLOB_CHARACTERS = "*?["
DEFAULT_INPUT_COLUMN = "path"
# A disc's index of its series (a DICOM file, but no image): a folder holding it is not one series.
DICOMDIR = "DICOMDIR"


class InputSpecError(ValueError):
    """``inputs=`` (or the questions) name nothing usable; a usage error (exit status 2)."""


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((*VOLUME_SUFFIXES, ZIP_SUFFIX))


def _starts_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def _visible(name: str) -> bool:
    return not name.startswith(".")


def search_folder(folder: Path) -> list[str]:
    """The inputs under ``folder`` (module docstring), sorted."""
    found: list[str] = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if _visible(d))
        here = Path(directory)
        others = []
        for name in sorted(f for f in files if _visible(f)):
            if is_volume_file(here / name):
                found.append(os.path.abspath(here / name))
            else:
                others.append(here / name)
        if any(_starts_like_dicom(path) for path in others if path.name.upper() != DICOMDIR):
            found.append(os.path.abspath(here))
            subdirectories[:] = []  # load_ct reads the whole tree below a series folder
    return sorted(found)


def read_list(path: Path, column: str = DEFAULT_INPUT_COLUMN) -> list[str]:
    """The paths listed in a ``.txt`` (one per line) or ``.csv`` (``column``) file, in file order."""
    base = path.parent
    if path.name.lower().endswith(".csv"):
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise InputSpecError(
                    f"{path}: no column {column!r} (columns: {', '.join(reader.fieldnames or []) or 'none'}); "
                    "name the column of paths with input_column=..."
                )
            entries = [(row.get(column) or "").strip() for row in reader]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        entries = [line.strip() for line in lines if not line.strip().startswith("#")]
    return [os.path.abspath(base / entry) for entry in entries if entry]


def find_inputs(spec: str | os.PathLike, column: str = DEFAULT_INPUT_COLUMN, limit: int | None = None) -> list[str]:
    """Absolute paths of the inputs ``spec`` names (module docstring), the first ``limit`` of them."""
    text = str(spec).strip()
    if not text:
        raise InputSpecError("inputs= is empty; give a folder, a .txt/.csv list or a glob")
    path = Path(text).expanduser()
    if path.is_dir():
        inputs = search_folder(path)
        what = f"folder {path} holds no NIfTI (.nii, .nii.gz), .npy, .zip or DICOM series"
    elif path.is_file() and path.name.lower().endswith(LIST_SUFFIXES):
        inputs = read_list(path, column)
        what = f"list {path} names no input"
    elif path.is_file():
        inputs = [os.path.abspath(path)]
        what = ""
    elif any(character in text for character in GLOB_CHARACTERS):
        inputs = sorted(os.path.abspath(match) for match in glob.glob(os.path.expanduser(text), recursive=True))
        what = f"the pattern {text!r} matches nothing"
    else:
        raise InputSpecError(f"inputs={text}: no such file or folder (give a folder, a .txt/.csv list or a glob)")
    inputs = list(dict.fromkeys(inputs))  # each input once, first place kept
    if not inputs:
        raise InputSpecError(what)
    if limit is not None:
        if limit < 1:
            raise InputSpecError(f"limit={limit}: give a positive number of inputs, or null for all")
        inputs = inputs[:limit]
    return inputs


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One question of a run: what the user asked (``text``, ``choices``) and the model's ``prompt``."""

    text: str | None  # None: the report prompt
    prompt: str
    choices: dict[str, str] | None = None


REPORT_QUESTION = Question(None, CAPTION_PROMPT)


def read_questions(value: str | Sequence[str] | None) -> list[str]:
    """``questions=``: ``@file`` (one per line), a list, or one question."""
    if value is None:
        return []
    if isinstance(value, str):
        if value.startswith("@"):
            path = Path(value[1:]).expanduser()
            if not path.is_file():
                raise InputSpecError(
                    f"questions={value}: {path} not found (a question file holds one question per line)"
                )
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [value.strip()] if value.strip() else []
    return [str(item).strip() for item in value if str(item).strip()]


def read_choices(value: str | Sequence[str] | None) -> list[str] | None:
    """``choices=``: ``"a|b|c|d"`` or a list of four."""
    if value is None:
        return None
    if isinstance(value, str):
        return [item.strip() for item in value.split("|")]
    return [str(item).strip() for item in value]


def build_questions(
    question: str | None, questions: str | Sequence[str] | None, choices: str | Sequence[str] | None
) -> list[Question]:
    """The questions of ``task=answer``, each with its training-format prompt (``choices``: closed)."""
    from med3dvlm.api import question_prompt

    texts = ([question.strip()] if question and question.strip() else []) + read_questions(questions)
    if not texts:
        raise InputSpecError('task=answer needs question="..." or questions=@file.txt (one per line)')
    options = read_choices(choices)
    built = []
    for text in dict.fromkeys(texts):
        try:
            prompt = question_prompt(text, options)
        except ValueError as error:
            raise InputSpecError(f"choices={choices!r}: {error}") from None
        built.append(Question(text, prompt, dict(zip(ANSWER_LETTERS, options)) if options else None))
    return built
