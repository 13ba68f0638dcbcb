"""The files of a ``predict`` run, and how the ranks' shards become one resumable ``out``.

For ``out=results/preds.jsonl``:

* ``preds.jsonl``: one row per (volume, question): ``id``, ``input``, ``task``, the output, ``model``
  and timing (``seconds`` of model time, ``read_seconds`` of reading and preprocessing);
* ``preds.jsonl.meta.json``: what made the rows (model path and hash, task, preprocessing, generation
  settings), written by the eval's :class:`PredictionWriter`, which refuses to add rows made otherwise;
* ``preds.safetensors`` (or ``.npy``), ``task=embed`` only: the ``(rows, dim)`` float32 embedding
  matrix (key ``embeddings``), row ``i`` belonging to line ``i`` of ``preds.jsonl`` (its ``row``);
* ``preds.jsonl.bad_inputs.jsonl``: the inputs of the last run that failed, with the reason (removed
  when none did); ``preds.jsonl.summary.json``: that run's counts and speed.

While a run goes, each rank appends its rows to its own shard, ``preds.jsonl.shards/rank-<k>.jsonl``
(flushed per batch), and rank 0 merges the shards into ``out`` at the end, in input order. A killed
run leaves its shards; the next run merges them first, so finished work is never redone.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from med3dvlm.evaluation.predictions import PredictionFileError, PredictionWriter
from med3dvlm.predicting.inputs import Question

log = logging.getLogger(__name__)

TASKS = ("report", "answer", "embed", "zero_shot")
EMBED_FORMATS = ("safetensors", "npy")
EMBEDDINGS_KEY = "embeddings"  # the matrix's name in the .safetensors file
SHARD_EMBEDDING_FIELD = "embedding"  # base64 float32 in shard rows, moved into the matrix on merge
SHARD_PREFIX = "rank-"


class MergeError(RuntimeError):
    """The shards hold the same row twice: a bug in the sharding, never silently resolved."""


def row_id(path: str, question: Question) -> str:
    """The key of a row: the input path, and the prompt when the task asks questions."""
    return path if question.text is None else f"{path} :: {question.prompt}"


def encode_embedding(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a shard: a last line torn by a kill mid-write is left out (its batch
    is redone); every other line must parse."""
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines[:-1], start=1):  # after the last newline: a torn line or nothing
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PredictionFileError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
    return rows


def matrix_path(out: Path, embed_format: str) -> Path:
    """``<out stem>.<format>``: ``preds.jsonl`` -> ``preds.safetensors``."""
    return out.with_suffix(f".{embed_format}")


def read_matrix(path: Path) -> np.ndarray | None:
    """The embedding matrix, read without running code (safetensors / ``allow_pickle=False``)."""
    if not path.exists():
        return None
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    if EMBEDDINGS_KEY not in tensors:
        raise PredictionFileError(f"{path} holds no {EMBEDDINGS_KEY!r} tensor (found {', '.join(tensors)})")
    return tensors[EMBEDDINGS_KEY]


def write_matrix(path: Path, matrix: np.ndarray) -> None:
    """Written under a temporary name, then renamed: a reader never sees half a matrix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial{path.suffix}")
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if path.suffix == ".npy":
        with temporary.open("wb") as handle:
            np.save(handle, matrix, allow_pickle=False)
    else:
        from safetensors.numpy import save_file

        save_file({EMBEDDINGS_KEY: matrix}, str(temporary))
    os.replace(temporary, path)


@dataclass
class MergeResult:
    written: int = 0  # rows added to out by this merge
    volumes: int = 0  # distinct inputs among them
    rows_per_rank: dict[int, int] = field(default_factory=dict)  # rows each rank's shard held
    bad: list[dict[str, str]] = field(default_factory=list)


class PredictionOutput:
    """``out`` and its companions (module docstring) for one run's ``settings``."""

    def __init__(self, out: str | os.PathLike, settings: Mapping[str, Any], embed_format: str = "safetensors") -> None:
        self.out = Path(out).expanduser()
        if self.out.suffix != ".jsonl":
            raise ValueError(f"out={self.out}: give a .jsonl file (one JSON row per volume and question)")
        if embed_format not in EMBED_FORMATS:
            raise ValueError(f"embed_format={embed_format!r}: expected one of {', '.join(EMBED_FORMATS)}")
        self.settings = dict(settings)
        self.task = self.settings["task"]
        self.embed_format = embed_format
        self.shard_dir = self.out.with_name(self.out.name + ".shards")
        self.bad_path = self.out.with_name(self.out.name + ".bad_inputs.jsonl")
        self.summary_path = self.out.with_name(self.out.name + ".summary.json")
        self.matrix_path = matrix_path(self.out, embed_format) if self.task == "embed" else None

    row_id = staticmethod(row_id)

    # -- out ------------------------------------------------------------------------------------
    def open(self) -> PredictionWriter:
        """``out``'s writer; refuses a file made with other settings (PredictionFileError)."""
        return PredictionWriter(self.out, self.settings)

    def done_ids(self) -> set[str]:
        return set(self.open().done_ids)

    def prepare(self) -> None:
        """Rank 0, before the run plans: check ``out``, merge the shards a killed run left."""
        writer = self.open()
        self._check_matrix(writer)
        if self.shard_dir.exists():
            result = self.merge(order={}, writer=writer, report_bad=False)
            log.info("merged %d rows that an interrupted run had left in %s", result.written, self.shard_dir)

    def _check_matrix(self, writer: PredictionWriter) -> None:
        if self.matrix_path is None or not writer.done_ids:
            return
        matrix = read_matrix(self.matrix_path)
        rows = len(writer.done_ids)
        if matrix is None or matrix.shape[0] < rows:
            found = "is missing" if matrix is None else f"holds {matrix.shape[0]} rows"
            raise PredictionFileError(
                f"{self.out} lists {rows} embeddings but {self.matrix_path} {found}; the two belong together: "
                "restore the matrix or write to a new out="
            )

    # -- shards ---------------------------------------------------------------------------------
    def shard_path(self, rank: int) -> Path:
        return self.shard_dir / f"{SHARD_PREFIX}{rank:05d}.jsonl"

    def shard_writer(self, rank: int) -> PredictionWriter:
        return PredictionWriter(self.shard_path(rank), self.settings)

    def bad_shard_path(self, rank: int) -> Path:
        return self.shard_dir / f"{SHARD_PREFIX}{rank:05d}.bad.jsonl"

    def record_bad(self, rank: int, records: Iterable[Mapping[str, str]]) -> None:
        records = list(records)
        if not records:
            return
        path = self.bad_shard_path(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records)
            handle.flush()
            os.fsync(handle.fileno())

    def _shard_rows(self) -> dict[int, list[dict[str, Any]]]:
        """Rows by rank."""
        rows: dict[int, list[dict[str, Any]]] = {}
        for path in sorted(self.shard_dir.glob(f"{SHARD_PREFIX}*.jsonl")):
            if path.name.endswith(".bad.jsonl"):
                continue
            rows[int(path.name[len(SHARD_PREFIX) :].split(".")[0])] = read_rows(path)
        return rows

    def _shard_bad(self) -> list[dict[str, str]]:
        records: list[dict[str, str]] = []
        for path in sorted(self.shard_dir.glob(f"{SHARD_PREFIX}*.bad.jsonl")):
            records += read_rows(path)
        return records

    # -- merging --------------------------------------------------------------------------------
    def merge(
        self, order: Mapping[str, int], writer: PredictionWriter | None = None, report_bad: bool = True
    ) -> MergeResult:
        """Append the shards' rows that ``out`` lacks, in ``order`` (id -> place; others last), then
        remove the shards. ``report_bad``: write this run's bad inputs beside ``out``."""
        writer = writer or self.open()
        result = MergeResult()
        if self.shard_dir.exists():
            by_rank = self._shard_rows()
            rows = [row for rank_rows in by_rank.values() for row in rank_rows]
            counts = Counter(str(row["id"]) for row in rows)
            repeated = sorted(i for i, n in counts.items() if n > 1)
            if repeated:
                raise MergeError(f"{self.shard_dir}: rows {', '.join(repeated[:5])} were written by more than one rank")
            new = [row for row in rows if not writer.is_done(str(row["id"]))]
            new.sort(key=lambda row: order.get(str(row["id"]), len(order)))
            if self.matrix_path is not None:
                self._append_embeddings(writer, new)
            writer.write(new)
            result.written, result.volumes = len(new), len({row["input"] for row in new})
            result.rows_per_rank = {rank: len(rank_rows) for rank, rank_rows in by_rank.items()}
            result.bad = self._shard_bad()
            shutil.rmtree(self.shard_dir)
        if report_bad:
            self._write_bad(result.bad)
        return result

    def _append_embeddings(self, writer: PredictionWriter, rows: list[dict[str, Any]]) -> None:
        """Matrix first (old rows + new, written atomically), then ``out``: a kill between the two
        leaves a matrix longer than ``out``, whose extra rows the next merge overwrites."""
        done = len(writer.done_ids)
        old = read_matrix(self.matrix_path) if done else None
        vectors = [decode_embedding(row.pop(SHARD_EMBEDDING_FIELD)) for row in rows]
        for offset, row in enumerate(rows):
            row["row"] = done + offset
        if not vectors:
            return
        parts = ([old[:done]] if old is not None else []) + [np.stack(vectors)]
        write_matrix(self.matrix_path, np.concatenate(parts))

    def _write_bad(self, records: Sequence[Mapping[str, str]]) -> None:
        if not records:
            self.bad_path.unlink(missing_ok=True)
            return
        from med3dvlm.evaluation.predictions import write_jsonl

        write_jsonl(self.bad_path, records)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        from med3dvlm.utils import write_atomic

        write_atomic(self.summary_path, (json.dumps(dict(summary), indent=2) + "\n").encode("utf-8"))


@dataclass
class RunSummary:
    """What a run did: printed at the end and written to ``<out>.summary.json``."""

    task: str
    out: str
    inputs: int  # in inputs=
    rows_expected: int  # inputs x questions
    rows_before: int  # already in out (resumed)
    rows_written: int  # added by this run
    volumes_read: int  # read and run through the model by this run
    seconds: float  # of the prediction loop (rank 0)
    bad: list[dict[str, str]]
    rows_per_rank: dict[int, int] = field(default_factory=dict)
    bad_file: str | None = None  # where the bad inputs are listed

    @property
    def volumes_per_second(self) -> float | None:
        return self.volumes_read / self.seconds if self.volumes_read and self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"volumes_per_second": self.volumes_per_second, "bad_inputs": len(self.bad)}

    def text(self) -> str:
        rate = f" ({self.volumes_per_second:.2f} volumes/s)" if self.volumes_per_second else ""
        done = (
            f"predict task={self.task}: {self.inputs} inputs, {self.rows_expected} rows wanted; "
            f"{self.rows_before} were in {self.out} already, {self.rows_written} written now "
            f"from {self.volumes_read} volumes in {self.seconds:.1f} s{rate}"
        )
        lines = [done]
        if self.bad:
            where = f" (listed in {self.bad_file}; rerunning the command retries them)" if self.bad_file else ""
            lines.append(f"{len(self.bad)} input(s) failed{where}:")
            lines += [f"  {record['input']}: {record['reason']}" for record in self.bad]
        else:
            lines.append("no input failed")
        return "\n".join(lines)
