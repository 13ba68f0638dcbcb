"""M3D-VQA's released CSVs beside a prepared dataset: the same rows, ``.npy`` image paths -> the
prepared format (SPEC §6)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.errors import DataError
from med3dvlm.utils import write_atomic


def rewrite_vqa_csvs(vqa_dir: Path, out_root: Path, volume_format: str) -> tuple[list[str], list[str], list[str]]:
    """Copy M3D's VQA CSVs into ``out_root/M3D-VQA`` with ``.npy`` image paths -> ``volume_format``.

    SPEC §6: M3D released its volumes as ``.npy``; a column rewrite adapts its CSVs. Returns lines
    for the summary: what was written, problems (rows that could not be rewritten, named by file
    and row; they are copied unchanged so the checker and readers flag them too), notes.
    """
    written, problems, notes = [], [], []
    names = [*layout.VQA_CSV.values(), *layout.VQA_YN_CSV.values()]
    present = [name for name in names if (vqa_dir / name).is_file()]
    if not present:
        return [], [f"{vqa_dir}: none of the M3D-VQA CSVs {names} found"], []
    for name in names:
        if name not in present:
            notes.append(f"{vqa_dir / name}: not present, not copied")
            continue
        try:
            line, row_problems = _rewrite_vqa_csv(vqa_dir / name, out_root, volume_format)
        except (OSError, csv.Error, UnicodeDecodeError, DataError) as exc:
            problems.append(f"{vqa_dir / name}: not copied: {exc}")
            continue
        written.append(line)
        problems.extend(row_problems)
    return written, problems, notes


def _rewrite_vqa_csv(source: Path, out_root: Path, volume_format: str) -> tuple[str, list[str]]:
    with source.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    header = [name.strip() for name in rows[0]] if rows else []
    if "Image Path" not in header:
        raise DataError(f"row 1 (header) has no 'Image Path' column; it has {header}")
    column = header.index("Image Path")
    problems, rewritten, missing = [], 0, 0
    target_suffix = "." + volume_format
    for row_number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) <= column:
            problems.append(f"{source}: row {row_number}: {len(row)} fields, no 'Image Path'; copied unchanged")
            continue
        path = row[column].strip()
        if path.lower().endswith(".npy"):
            row[column] = path[: -len(".npy")] + target_suffix
            rewritten += 1
        elif not path.lower().endswith(layout.VOLUME_SUFFIXES):
            problems.append(f"{source}: row {row_number}: 'Image Path' {path!r} is not a volume file; copied unchanged")
            continue
        if not (out_root / row[column].strip()).is_file():
            missing += 1
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows[1:]])
    target = out_root / layout.VQA_DIR / source.name
    write_atomic(target, buffer.getvalue().encode("utf-8"))
    line = f"{target}: {len(rows) - 1} rows, {rewritten} image paths .npy -> {target_suffix}"
    if missing:
        line += f"; {missing} rows name a volume not (yet) in {out_root}"
    return line, problems
