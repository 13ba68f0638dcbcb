"""The CPU VLM experiments' data parallelism (strategy=cpu_ddp): two gloo processes started by
Lightning through Hydra, the data sharded by the project's sampler, one writer of the hand-offs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra_helpers import compose_config, small_llm

from med3dvlm import resolvers
from med3dvlm.resolvers import cpu_has_native_bf16, cpu_processes, per_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_cpu_vlm_experiments_run_two_one_thread_processes_with_the_spec_batch_in_all(tmp_path):
    for experiment, total in (("pretrain", 16), ("finetune", 8)):  # SPEC §5 batch sizes
        cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
        assert cfg.trainer.strategy.process_group_backend == "gloo" and cfg.trainer.accelerator == "cpu"
        assert cfg.trainer.devices == min(2, len(os.sched_getaffinity(0)))
        assert cfg.data.datamodule.batch_size * cfg.trainer.devices == total
        assert cfg.trainer.use_distributed_sampler is False  # the project's sampler shards the data


def test_resolvers_split_a_batch_and_count_cores():
    assert per_process(16, 2) == 8 and per_process(8, "1") == 8
    with pytest.raises(ValueError, match="cannot be split evenly"):
        per_process(8, 3)
    with pytest.raises(ValueError, match="give trainer.devices a number"):
        per_process(8, "auto")
    assert cpu_processes(2) == min(2, len(os.sched_getaffinity(0))) and cpu_processes(1) == 1


def test_cpu_precision_is_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch):
    assert cpu_has_native_bf16("processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags : fpu amx_bf16\n")
    assert not cpu_has_native_bf16("flags : fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16("model name : avx512_bf16 in a name, not a flag\n")
    monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda: False)
    assert resolvers.cpu_precision("bf16-mixed") == "32-true"
    assert resolvers.cpu_precision("32-true") == "32-true"
    monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda: True)
    assert resolvers.cpu_precision("bf16-mixed") == "bf16-mixed"


def run_stage(tmp_path: Path, name: str, *overrides: str) -> str:
    command = [
        sys.executable,
        "-m",
        "med3dvlm.train",
        f"experiment={name}",
        "debug=tiny",
        *small_llm(layers=1),
        "trainer.devices=2",
        "callbacks.progress_bar=null",
        "logger=csv",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / name}",
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # Lightning gives each process cores // processes threads
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_pretrain_then_finetune_in_two_processes(tmp_path):
    pretrain = run_stage(tmp_path, "pretrain")
    assert "Starting with 2 processes" in pretrain
    assert len(re.findall(r"projector saved to", pretrain)) == 1  # one writer
    run = tmp_path / "pretrain"
    assert (run / "projector" / "model.safetensors").is_file() and (run / "image_encoder" / "encoder.json").is_file()

    finetune = run_stage(
        tmp_path,
        "finetune",
        f"encoder.pretrained={run / 'image_encoder'}",
        f"model.projector_path={run / 'projector'}",
        "trainer.limit_test_batches=3",
    )
    assert "Starting with 2 processes" in finetune
    results = json.loads((tmp_path / "finetune" / "vqa_closed.json").read_text())
    sources = [record["source"] for record in results["predictions"]]
    # 3 batches of 4 per process, the shards interleaved: the first 24 test questions, each once
    rows = sorted(int(source.rsplit(" ", 1)[1]) for source in sources)
    assert rows == list(range(2, 2 + 3 * 4 * 2))
    assert results["accuracy"]["overall"]["count"] == 24
