"""Smoke runs of experiments/benchmarks: each script runs at --quick sizes and writes valid JSON.

The numbers are not checked (speed goals are read from the full runs' printed tables); what is
checked is that every table's rows are there, with finite values where they are measured.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the benchmark scripts of experiments/: make test-slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch):
    """Imports a benchmark script as a module; restores torch's thread count afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield lambda name: importlib.import_module(name)
    torch.set_num_threads(threads)


def run_quick(module, tmp_path: Path, *extra: str) -> dict:
    output = tmp_path / f"{module.NAME}.json"
    assert module.main(["--quick", "--threads", "1", "--json", str(output), *extra]) == 0
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == module.NAME
    assert payload["machine"]["torch_threads"] == 1 and "load_average_1_5_15min" in payload["machine"]
    assert payload["settings"]["quick"] is True
    return payload


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_encoder_benchmark(benchmark, tmp_path, capsys):
    payload = run_quick(benchmark("bench_encoder"), tmp_path)
    forward = {row["variant"]: row for row in payload["forward"]}
    fast = next(row for name, row in forward.items() if name.startswith("FastDCFormer"))
    assert fast["max_rel_err"] < 1e-5  # the optimised encoder's outputs, checked in the benchmark too
    assert any(name.startswith("vit3d") for name in forward)
    for row in payload["forward"] + payload["forward_backward"]:
        assert finite(row["volumes_per_s"]) and finite(row["gflops_per_s"]) and row["best_s"] > 0
    assert {row["variant"] for row in payload["forward_backward"]} >= {
        "plain fp32",
        "gradient checkpointing (per stage)",
    }
    assert payload["flops_per_volume"]["forward"]["dcformer"] > 0
    assert "forward + backward, train mode" in capsys.readouterr().out


def test_train_step_benchmark(benchmark, tmp_path):
    payload = run_quick(benchmark("bench_train_step"), tmp_path)
    steps = {row["option"]: row for row in payload["steps"]}
    assert {"baseline (fp32)", "channels-last-3d", "gradient checkpointing"} <= set(steps)
    assert all(finite(row["best_s"]) and row["best_s"] > 0 for row in steps.values())


def test_generation_benchmark(benchmark, tmp_path):
    payload = run_quick(benchmark("bench_generation"), tmp_path)
    sizes = [row["batch_size"] for row in payload["rows"]]
    assert sizes[0] == 1 and len(sizes) > 1
    assert all(finite(row["samples_per_s"]) for row in payload["rows"])


def test_siglip_loss_benchmark(benchmark, tmp_path):
    payload = run_quick(benchmark("bench_siglip_loss"), tmp_path)
    rows = payload["rows"]
    assert {row["loss"] for row in rows} == {"full", "chunked"}
    assert all(row["max_rel_diff_vs_full"] < 1e-4 for row in rows)  # same loss and gradients


def test_loader_benchmark(benchmark, tmp_path):
    payload = run_quick(benchmark("bench_loader"), tmp_path, "--dir", str(tmp_path))
    assert {row["volume_format"] for row in payload["rows"]} == {"nii.gz", "nii"}
    assert all(finite(row["volumes_per_s"]) for row in payload["rows"])


def test_memory_benchmark(benchmark, tmp_path):
    payload = run_quick(benchmark("bench_memory_7b"), tmp_path)
    # SPEC §5 LoRA r=16 on every Linear of Qwen2.5-7B, written out: 28 layers x 16 x (in + out)
    per_layer = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584)
    assert payload["lora_params_7b"] == 28 * 16 * per_layer
    assert {row["configuration"] for row in payload["totals"]} >= {"LLM gradient checkpointing"}
    assert all(finite(row["total_gb"]) for row in payload["totals"])


def test_harness_live_tensor_peak_counts_what_is_alive():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        harness = importlib.import_module("harness")
    finally:
        sys.path.remove(str(BENCHMARKS))
    base = torch.ones(1000)
    with harness.LiveTensorPeak() as live:
        a = torch.zeros(256)  # 1 KiB
        b = a + 1  # another 1 KiB
        view = base[:10]  # no new memory
        base.add_(1)  # in place: no new memory
        del a
        c = torch.ones(128)  # 512 B, after a was freed
    assert live.peak == 2048 and live.current == 1024 + 512
    del b, c, view
