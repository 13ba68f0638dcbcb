"""Smoke run of experiments/benchmarks/bench_predict.py at --quick sizes: both tasks, both ways, valid
JSON, the same outputs either way (the speed goal is read from the full run's table, README Speed)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # a benchmark script of experiments/: make test-slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def test_predict_benchmark(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        module = importlib.import_module("bench_predict")
        output = tmp_path / "predict.json"
        assert module.main(["--quick", "--threads", "1", "--json", str(output), "--workers", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == "predict" and payload["settings"]["quick"] is True
    rows = {(row["task"], row["way"]): row for row in payload["rows"]}
    assert set(rows) == {(task, way) for task in ("embed", "report") for way in ("Python loop", "predict")}
    assert all(math.isfinite(row["volumes_per_s"]) and row["volumes_per_s"] > 0 for row in rows.values())
    assert rows[("embed", "predict")]["agreement"] < 1e-5  # the same embeddings as the loop's
    assert rows[("report", "predict")]["agreement"] == 1.0  # the same reports
