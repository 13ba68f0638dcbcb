"""Volumes per second that ``load_volume`` reads: ``.nii.gz`` against the fast ``.nii`` copies.

    make bench-data
    python experiments/bench_data.py [--volumes 8] [--shape 128 256 256] [--repeats 5] [--dir DIR]

One process (so per core), the prepared shape of SPEC §6 by default. The formats take turns in
every pass and the best pass of each counts, so load from other processes skews them alike. The volumes are made the way
real ones are: a phantom CT rendered at a lower resolution, cut to 8 bits as slices are, then put
through the preparation (min-max scaling, foreground crop, trilinear resize), so they hold the
non-round values that make real float32 ``.nii.gz`` files compress as they do.

Warm: files in the page cache (read once before timing). Cold: each file's cached pages are
dropped first with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``fsync`` (no root needed);
when ``fincore`` is installed the drop is verified, and on tmpfs (RAM) no cold figure is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from med3dvlm.data.phantoms import render_volume, sample_case
from med3dvlm.data.preprocessing import PREPARED_SHAPE, crop_and_resize, scale_min_max
from med3dvlm.data.volumes import load_volume, save_volume

# (label, file name pattern, encoding): the prepared NIfTI, M3D's own .npy, the fast copies
VARIANTS = (
    ("nii.gz float32 (prepared)", "gz/volume{index}.nii.gz", "float32"),
    ("npy float32 (M3D release)", "npy/volume{index}.npy", "float32"),
    ("nii uint8 (fast, default)", "u8/volume{index}.nii", "uint8"),
    ("nii int16 (fast)", "i16/volume{index}.nii", "int16"),
)
RAW_SCALE = 0.75  # raw resolution relative to the prepared shape, so the resize interpolates
BASELINE = VARIANTS[0][0]


def realistic_volume(index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A prepared-like float32 volume: phantom -> 8-bit slices -> SPEC §6 preparation."""
    raw_shape = tuple(max(16, int(edge * RAW_SCALE)) for edge in shape)
    rendered = render_volume(sample_case(0, index), raw_shape, seed=0)
    slices = np.round(rendered * 255).astype(np.uint8).astype(np.float32)
    return crop_and_resize(scale_min_max(slices, f"volume {index}"), shape, f"volume {index}")


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # dirty pages cannot be dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def cached_bytes(paths: list[Path]) -> int | None:
    """Bytes of ``paths`` in the page cache, per ``fincore``; None when it is not installed."""
    if shutil.which("fincore") is None:
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return None
    return sum(int(line.split()[0]) for line in result.stdout.splitlines() if line.strip())


def file_system_type(folder: Path) -> str:
    """The file system of ``folder`` per /proc/mounts (longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(folder.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3 or len(fields[1]) <= len(best):
            continue
        if resolved == fields[1] or resolved.startswith(fields[1].rstrip("/") + "/"):
            best, kind = fields[1], fields[2]
    return kind


def time_loads(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        load_volume(path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8, help="volumes per format (default 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(PREPARED_SHAPE), metavar=("D", "H", "W"))
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per format; the best is shown")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp folder)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    folder = Path(tempfile.mkdtemp(prefix="med3dvlm-bench-", dir=args.dir))
    try:
        return run(folder, shape, args.volumes, args.repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(folder: Path, shape: tuple[int, int, int], volumes: int, repeats: int) -> int:
    file_system = file_system_type(folder)
    cold_possible = hasattr(os, "posix_fadvise") and file_system not in ("tmpfs", "ramfs")
    print(f"load_volume, 1 process, {volumes} volumes of {'x'.join(map(str, shape))}, best of {repeats} passes")
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"files in {folder} ({file_system})")  # fmt: skip
    print("making volumes ...", file=sys.stderr)
    files: dict[str, list[Path]] = {label: [] for label, _, _ in VARIANTS}
    for index in range(volumes):
        volume = realistic_volume(index, shape)
        for label, pattern, encoding in VARIANTS:
            files[label].append(save_volume(volume, folder / pattern.format(index=index), encoding=encoding))
    warm: dict[str, float] = dict.fromkeys(files, 0.0)
    cold: dict[str, float | None] = dict.fromkeys(files, 0.0 if cold_possible else None)
    verified = True
    for paths in files.values():
        time_loads(paths)  # into the page cache
    for _ in range(repeats):
        for label, paths in files.items():
            warm[label] = max(warm[label], volumes / time_loads(paths))
    for _ in range(repeats if cold_possible else 0):
        for label, paths in files.items():
            drop_from_page_cache(paths)
            left = cached_bytes(paths)
            verified = verified and left == 0
            cold[label] = max(cold[label], volumes / time_loads(paths))
    rows = [
        (label, sum(p.stat().st_size for p in paths) / len(paths) / 2**20, warm[label], cold[label])
        for label, paths in files.items()
    ]
    base_warm = rows[0][2]
    base_cold = rows[0][3]
    print(f"{'format':28} {'MiB/volume':>10} {'warm vol/s':>11} {'x nii.gz':>9} {'cold vol/s':>11} {'x nii.gz':>9}")
    for label, size, warm, cold in rows:
        cold_text = f"{cold:11.1f} {cold / base_cold:8.1f}x" if cold is not None else f"{'n/a':>11} {'':>9}"
        print(f"{label:28} {size:10.1f} {warm:11.1f} {warm / base_warm:8.1f}x {cold_text}")
    if not cold_possible:
        print(f"cold cache: not measured ({file_system} holds files in memory, or no posix_fadvise)")
    elif verified:
        print("cold cache: pages dropped with posix_fadvise(DONTNEED), verified empty with fincore")
    else:
        print("cold cache: pages dropped with posix_fadvise(DONTNEED); not verified (fincore missing or pages kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
