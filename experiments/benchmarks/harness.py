"""What every benchmark in this folder shares: flags, timing, peak memory, FLOPs, tables and JSON.

Timing: alternatives are run in interleaved rounds after a warm-up call and the best round of each
counts, so load from other processes (CI neighbours, a training job) skews them alike and the
ratios stay meaningful. The machine's load average is recorded next to every result.

Peak memory (``measure_memory``): the most tensor storage alive at once (a dispatch mode that
follows every tensor an op creates; on CUDA the allocator's peak), and on a CPU also the growth of the
process's peak resident set (Linux: freed heap returned with ``malloc_trim``, then
``/proc/self/clear_refs`` resets the high-water mark read back from ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

DEFAULT_OUTPUT_DIR = Path("outputs") / "benchmarks"
MIB = 2**20


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round: a smoke run (tests, CI)")
    parser.add_argument(
        "--json", type=Path, default=None, help=f"where to write results (default {DEFAULT_OUTPUT_DIR}/<name>.json)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds; the best counts")
    return parser


def configure(args: argparse.Namespace, default_repeats: int) -> None:
    """Applies --threads, fills --repeats (1 with --quick), keeps the hub offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else default_repeats


def machine() -> dict[str, Any]:
    """The facts a timing depends on: processor, cores, threads, load, library versions."""
    model = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1) if match else model
    except OSError:
        pass
    info = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def machine_line(info: dict[str, Any]) -> str:
    load = info["load_average_1_5_15min"]
    load_text = " / ".join(f"{x:.2f}" for x in load) if load else "n/a"
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} with {info['torch_threads']} "
        f"threads, load average {load_text} (1/5/15 min)"
    )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_times(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each alternative, measured in ``repeats`` interleaved rounds."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize()
            start = time.perf_counter()
            call()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {"best_s": min(times), "median_s": statistics.median(times), "rounds": len(times)}


class PeakMemory:
    """``with PeakMemory() as peak: work()`` then ``peak.bytes``: the most memory ``work`` held at
    once beyond what was held before (None where it cannot be measured). On a CPU this is the growth
    of the resident set: what the process really took, allocator caching and fragmentation included."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._before: int | None = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            self._before = _reset_resident_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._before
        elif self._before is not None:
            peak = _status_kib("VmHWM")
            self.bytes = None if peak is None else max(0, peak * 1024 - self._before)


class LiveTensorPeak(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among the tensors created inside the block.

    Every op's fresh output storages are counted until they are freed (a weak reference on the
    storage); outputs that share an input's storage (views, in-place ops) are not new memory. This
    is what a GPU caching allocator would have to hold, free of CPU allocator effects; scratch
    memory an op allocates and frees internally is not seen. Slows every op: measure, don't time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._live:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_resident_peak() -> int | None:
    """Resident bytes now, after returning freed heap and resetting the peak; None if unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    resident = _status_kib("VmRSS")
    return None if resident is None else resident * 1024


def measure_memory(call: Callable[[], Any], device: str | torch.device = "cpu") -> dict[str, float | None]:
    """Peak MiB of one ``call``: ``peak_mib`` = tensors alive at once (:class:`LiveTensorPeak`; on
    CUDA the allocator's peak), ``rss_mib`` = growth of the process's resident set (CPU only)."""
    device = torch.device(device)
    if device.type == "cuda":
        with PeakMemory(device) as peak:
            call()
        return {"peak_mib": _mib(peak.bytes), "rss_mib": None}
    with PeakMemory(device) as resident:
        call()
    try:
        with LiveTensorPeak() as live:
            call()
        tensors = live.peak
    except Exception:  # e.g. compiled code that refuses Python dispatch modes
        tensors = None
    return {"peak_mib": _mib(tensors), "rss_mib": _mib(resident.bytes)}


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def matmul_peak_gflops(size: int, repeats: int, device: str | torch.device = "cpu") -> float:
    """fp32 GFLOP/s of a square matmul, the best of ``repeats``: the yardstick for achieved GFLOP/s."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    best = min(interleaved_times({"mm": lambda: torch.mm(a, b, out=out)}, max(repeats, 3))["mm"])
    return 2 * size**3 / best / 1e9


def count_flops(call: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions ``call`` runs, per torch's counter;
    run it on meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


def relative_error(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """Largest ``max|out - ref| / max|ref|`` over paired tensors."""
    worst = 0.0
    for out, ref in zip(outputs, references, strict=True):
        ref = ref.detach().float()
        scale = ref.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, float((out.detach().float() - ref).abs().max() / scale))
    return worst


def format_value(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec); the first column is left-aligned."""
    cells = [[format_value(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(header), *(len(line[i]) for line in cells)) for i, (_, header, _) in enumerate(columns)]
    print(f"\n{title}")
    header = [h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths))]
    print("  ".join(header))
    for line in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def write_json(args: argparse.Namespace, name: str, results: dict[str, Any], info: dict[str, Any]) -> Path:
    path = args.json or DEFAULT_OUTPUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    payload = {"benchmark": name, "machine": info, "settings": settings, **results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults written to {path}")
    return path


def compose_train_config(overrides: Sequence[str], output_dir: str | os.PathLike):
    """The shipped ``train`` config with ``overrides`` (as on the command line), outputs in ``output_dir``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from med3dvlm.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module("med3dvlm.configs", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        for key in ("output_dir", "log_dir", "data_dir", "work_dir"):
            cfg.paths[key] = str(Path(output_dir) / key)
    return cfg
