"""``predict`` in two CPU processes (gloo, ``strategy=ddp trainer.devices=2``), started by Lightning
through Hydra as on a GPU node: each input is read and written by exactly one rank, and the merged
``out`` (rows and embedding matrix) equals the single-process run's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra_helpers import compose_config

from med3dvlm.predicting.outputs import read_matrix
from med3dvlm.predicting.run import run_predict

pytestmark = pytest.mark.slow  # two gloo processes: make test-slow

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "med3dvlm.predict", f"out={tmp_path / name / 'out.jsonl'}", "progress=false",
        f"hydra.run.dir={tmp_path / name / 'hydra'}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)


def index(path: Path) -> list[dict]:
    timing = ("seconds", "read_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]


def test_two_processes_write_each_input_once_and_merge_to_the_single_process_file(tiny_models, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for number, volume in enumerate(tiny_models.volumes):  # six volumes and a corrupt one
        shutil.copy(volume, scans / f"case{number}.nii.gz")
    (scans / "case9_corrupt.nii.gz").write_bytes(b"not a volume")
    common = [f"model_dir={tiny_models.clip_dir}", f"inputs={scans}", "task=embed", "batch_size=2", "num_workers=0"]

    cfg = compose_config("predict", [*common, f"out={tmp_path / 'single' / 'out.jsonl'}", "progress=false"], tmp_path)
    assert len(run_predict(cfg).bad) == 1  # the reference, in this process
    sharded = run(tmp_path, "ddp", *common, "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert sharded.returncode == 1, sharded.stderr[-4000:]
    assert "Starting with 2 processes" in sharded.stdout + sharded.stderr

    summary = json.loads((tmp_path / "ddp" / "out.jsonl.summary.json").read_text())
    # pending inputs 0..6 alternate between the ranks: 4 on rank 0 (one corrupt), 3 on rank 1
    assert summary["rows_per_rank"] == {"0": 3, "1": 3} and summary["bad_inputs"] == 1
    rows = index(tmp_path / "ddp" / "out.jsonl")
    assert [row["input"] for row in rows] == [str(scans / f"case{n}.nii.gz") for n in range(6)]  # each once, in order
    assert rows == index(tmp_path / "single" / "out.jsonl")
    single_matrix = read_matrix(tmp_path / "single" / "out.safetensors")
    sharded_matrix = read_matrix(tmp_path / "ddp" / "out.safetensors")
    assert sharded_matrix.shape == single_matrix.shape == (6, single_matrix.shape[1])
    np.testing.assert_allclose(sharded_matrix, single_matrix, atol=1e-6, rtol=1e-5)
    bad = [json.loads(line) for line in (tmp_path / "ddp" / "out.jsonl.bad_inputs.jsonl").read_text().splitlines()]
    assert [Path(record["input"]).name for record in bad] == ["case9_corrupt.nii.gz"]
