"""Small helpers every layer may use (the lowest layer; imports nothing of med3dvlm).

* files: written under a temporary name and renamed into place (``write_atomic``, ``atomic_path``),
  so a killed run never leaves a half-written file under its final name; JSON and CSV as bytes;
* processes: the usable cores (``available_cores``) and a process pool with a progress bar in
  which one crashed job becomes a result, not a gap (``run_jobs``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")

TEMPORARY_MARK = ".tmp"  # in the name of every file written under a temporary name


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A new empty file beside ``path`` to write to; renamed onto ``path`` when the block ends,
    removed when it raises. ``suffix`` ends the temporary name (writers that choose the format by
    the extension need it). Parent folders are created.

    The file gets the usual umask permissions (``tempfile.mkstemp`` would make it owner-only, which
    would stick to the final file and break datasets shared between users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_MARK}{suffix}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``atomic_path``: all of it or, after a crash, nothing."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def remove_temporary_files(folder: Path) -> int:
    """Delete what a killed run left under temporary names (``.<name>.<hex>.tmp*``) in ``folder``."""
    if not folder.is_dir():
        return 0
    leftovers = [p for p in folder.rglob(".*") if p.is_file() and TEMPORARY_MARK in p.name]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def json_bytes(content: object, indent: int = 2, ensure_ascii: bool = False) -> bytes:
    """``content`` as indented JSON text ending in a newline, UTF-8."""
    return (json.dumps(content, indent=indent, ensure_ascii=ensure_ascii) + "\n").encode("utf-8")


def csv_bytes(columns: Iterable[str], rows: Iterable[Iterable[object]]) -> bytes:
    """A header and rows as CSV text (``\\n`` line ends), UTF-8."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or a job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def one_torch_thread() -> None:
    """Worker initializer: one torch thread per process, as the processes already use every core."""
    import torch

    torch.set_num_threads(1)


def run_jobs(
    function: Callable[[Job], Result],
    jobs: Sequence[Job],
    crashed: Callable[[Job, BaseException], Result],
    workers: int,
    progress: bool,
    description: str,
    initializer: Callable[[], None] | None = one_torch_thread,
    unit: str = "case",
) -> Iterator[Result]:
    """``function(job)`` for every job on ``workers`` processes, in completion order, with a bar.

    A job whose process dies (e.g. killed for memory) becomes ``crashed(job, error)``, never a gap.
    """
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    workers = max(1, min(workers, len(jobs)))
    bar = {"total": len(jobs), "desc": description, "unit": unit, "disable": not progress, "file": sys.stderr}
    if workers == 1:
        with tqdm(**bar) as progress_bar:
            for job in jobs:
                yield function(job)
                progress_bar.update()
        return
    # fork shares the already imported numpy/torch/MONAI with the workers (seconds saved per
    # worker); it is safe only while this process runs a single thread.
    use_fork = sys.platform.startswith("linux") and threading.active_count() == 1
    context = multiprocessing.get_context("fork") if use_fork else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer) as pool:
        futures = {pool.submit(function, job): job for job in jobs}
        try:
            with tqdm(**bar) as progress_bar:
                for future in as_completed(futures):
                    try:
                        result = future.result()
                    except Exception as exc:  # noqa: BLE001 - the worker process died
                        result = crashed(futures[future], exc)
                    progress_bar.update()
                    yield result
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
