"""Batch inference (``python -m med3dvlm.predict``, issue #21) on the tiny models: every task against
the one-volume API as the reference, inputs found in folders / lists / globs, resume without
recomputing, refused setting changes, bad inputs listed while the rest is done, and the exit statuses.

The runs go through the shipped ``configs/predict.yaml`` (composed as Hydra does) in this process;
two subprocess runs check what the command line prints and returns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ct_files import phantom_hu, write_dicom_series, write_hu_nifti, zip_folder
from hydra_helpers import compose_config

import med3dvlm
from med3dvlm.data.volumes import load_volume, save_volume
from med3dvlm.evaluation.predictions import PredictionFileError
from med3dvlm.models.contrastive import ContrastiveModel
from med3dvlm.models.vlm import Med3DVLM
from med3dvlm.predicting.data import PendingInput, share_of_rank
from med3dvlm.predicting.inputs import InputSpecError, Question, find_inputs
from med3dvlm.predicting.module import BadInputStop
from med3dvlm.predicting.outputs import MergeError, PredictionOutput, read_matrix
from med3dvlm.predicting.run import run_predict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TIMING = ("seconds", "read_seconds")
QUESTIONS = ["Which organ has a lesion?", "What plane is this scan?"]
NEW_TOKENS = 4


def predict(tmp_path: Path, model_dir, inputs, out: Path, *overrides: str):
    cfg = compose_config(
        "predict",
        [f"model_dir={model_dir}", f"inputs={inputs}", f"out={out}", "num_workers=0", "progress=false",
         f"max_new_tokens={NEW_TOKENS}", *overrides],
        tmp_path,
    )  # fmt: skip
    return run_predict(cfg)


def rows(path: Path, timing: bool = True) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines if timing else [{k: v for k, v in row.items() if k not in TIMING} for row in lines]


@pytest.fixture(scope="module")
def scans(tiny_models, tmp_path_factory) -> Path:
    """A folder as users have one: prepared phantoms (NIfTI, .npy), raw CT as a DICOM series folder
    (files without suffix), its zip and a HU NIfTI, in sub-folders."""
    root = tmp_path_factory.mktemp("scans")
    shutil.copy(tiny_models.volumes[0], root / "a.nii.gz")
    save_volume(load_volume(tiny_models.volumes[1]), root / "b.npy")
    (root / "study").mkdir()
    shutil.copy(tiny_models.volumes[2], root / "study" / "c.nii.gz")
    hu = phantom_hu(load_volume(tiny_models.volumes[3]))
    write_dicom_series(hu, root / "patient" / "series")
    zip_folder(root / "patient" / "series", root / "d.zip")
    write_hu_nifti(phantom_hu(load_volume(tiny_models.volumes[4])), root / "study" / "e.nii.gz")
    return root


def expected_inputs(root: Path) -> list[str]:
    names = ["a.nii.gz", "b.npy", "d.zip", "patient/series", "study/c.nii.gz", "study/e.nii.gz"]
    return [os.path.abspath(root / name) for name in names]


def bad_scans(tiny_models, root: Path) -> Path:
    """Two good volumes around a corrupt file and a folder holding two DICOM series."""
    root.mkdir()
    shutil.copy(tiny_models.volumes[0], root / "a.nii.gz")
    (root / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b truncated")
    hu = phantom_hu(load_volume(tiny_models.volumes[1]))
    for number, seed in ((3, 1), (4, 2)):
        for path in write_dicom_series(hu, root / "tmp", series_number=number, seed=seed):
            (root / "c_two_series").mkdir(exist_ok=True)
            path.rename(root / "c_two_series" / f"{number}_{path.name}")
    shutil.rmtree(root / "tmp")
    shutil.copy(tiny_models.volumes[2], root / "d.nii.gz")
    return root


class CountingCalls:
    """Counts the volumes an ``nn.Module`` method is given (its first argument's batch size)."""

    def __init__(self, monkeypatch, cls, name: str) -> None:
        self.volumes = 0
        original = getattr(cls, name)

        def counted(module, images, *args, **kwargs):
            self.volumes += int(images.shape[0])
            return original(module, images, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


# -- inputs -----------------------------------------------------------------------------------------
def test_a_folder_is_searched_for_nifti_npy_zip_and_dicom_series_folders(scans, tmp_path):
    (scans / ".hidden.nii.gz").write_bytes(b"")
    (scans / "notes.txt").write_text("not a volume")
    assert find_inputs(scans) == expected_inputs(scans)
    assert find_inputs(scans, limit=2) == expected_inputs(scans)[:2]
    # a disc's DICOMDIR index does not make its folder a series: the series below it are the inputs
    disc = tmp_path / "disc"
    for name in ("s1", "s2"):
        shutil.copytree(scans / "patient" / "series", disc / "DICOM" / name)
    (disc / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))
    assert find_inputs(disc) == [os.path.abspath(disc / "DICOM" / name) for name in ("s1", "s2")]
    # a DICOM folder given directly is one input, as is a file
    assert find_inputs(scans / "patient" / "series") == [os.path.abspath(scans / "patient" / "series")]
    assert find_inputs(scans / "a.nii.gz") == [os.path.abspath(scans / "a.nii.gz")]


def test_lists_csv_columns_and_globs(scans, tmp_path):
    listing = tmp_path / "lists" / "scans.txt"
    listing.parent.mkdir()
    relative = os.path.relpath(scans / "b.npy", listing.parent)
    listing.write_text(f"# my scans\n{scans / 'a.nii.gz'}\n\n{relative}\n{scans / 'a.nii.gz'}\nmissing.nii.gz\n")
    assert find_inputs(listing) == [
        os.path.abspath(scans / "a.nii.gz"), os.path.abspath(scans / "b.npy"), os.path.abspath(listing.parent / "missing.nii.gz"),
    ]  # fmt: skip
    table = tmp_path / "scans.csv"
    table.write_text(f"case,file\n1,{scans / 'd.zip'}\n2,{scans / 'patient' / 'series'}\n")
    assert find_inputs(table, column="file") == [
        os.path.abspath(scans / "d.zip"),
        os.path.abspath(scans / "patient/series"),
    ]
    with pytest.raises(InputSpecError, match="no column 'path'.*columns: case, file.*input_column"):
        find_inputs(table)
    assert find_inputs(f"{scans}/**/*.nii.gz") == [
        os.path.abspath(scans / n) for n in ("a.nii.gz", "study/c.nii.gz", "study/e.nii.gz")
    ]
    with pytest.raises(InputSpecError, match="matches nothing"):
        find_inputs(f"{scans}/*.dcm")
    with pytest.raises(InputSpecError, match="no such file or folder"):
        find_inputs(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputSpecError, match="holds no NIfTI"):
        find_inputs(empty)


# -- every task against the one-volume API -------------------------------------------------------------
@pytest.mark.parametrize("embed_format", ["safetensors", "npy"])
def test_embed_writes_the_matrix_of_the_api_embeddings_and_its_index(
    tiny_models, scans, tmp_path, embed_format, caplog
):
    caplog.set_level(logging.INFO, logger="med3dvlm.predicting.module")
    out = tmp_path / "embeddings.jsonl"
    summary = predict(
        tmp_path,
        tiny_models.clip_dir,
        scans,
        out,
        "task=embed",
        "batch_size=4",
        f"embed_format={embed_format}",
        "progress=true",
    )
    index = rows(out)
    assert [row["input"] for row in index] == expected_inputs(scans) and [row["row"] for row in index] == list(range(6))
    assert all(row["task"] == "embed" and row["model"] == str(tiny_models.clip_dir) for row in index)
    matrix = read_matrix(out.with_suffix(f".{embed_format}"))
    reference = med3dvlm.load_model(tiny_models.clip_dir)  # the plain DCFormer, one volume at a time
    expected = torch.stack([reference.embed_image(path) for path in expected_inputs(scans)])
    assert matrix.shape == tuple(expected.shape) and matrix.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(matrix), expected, atol=1e-5, rtol=1e-4)
    assert summary.rows_written == summary.volumes_read == 6 and not summary.bad
    assert re.search(r"predict: 6/6 volumes, [\d.]+ volumes/s, ETA 0 s", caplog.text)  # the progress without a terminal
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["task"] == "embed" and meta["preprocessing"]["hu_window"] == [-1000.0, 1000.0] and meta["model_hash"]


def test_report_and_answers_are_the_api_answers(tiny_models, scans, tmp_path):
    inputs = expected_inputs(scans)[:3]
    listing = tmp_path / "three.txt"
    listing.write_text("\n".join(inputs) + "\n")
    vlm = med3dvlm.load_model(tiny_models.vlm_dir)

    report = tmp_path / "reports.jsonl"
    predict(tmp_path, tiny_models.vlm_dir, listing, report, "task=report", "batch_size=2")
    assert [(r["input"], r["task"], r["output"]) for r in rows(report)] == [
        (path, "report", vlm.describe(path, max_new_tokens=NEW_TOKENS)) for path in inputs
    ]
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    choices = ["Liver", "Kidney", "Spleen", "Lung"]
    closed = tmp_path / "closed.jsonl"
    predict(
        tmp_path,
        tiny_models.vlm_dir,
        listing,
        closed,
        "task=answer",
        f"questions=@{questions}",
        "choices=" + "|".join(choices),
        "batch_size=2",
    )
    expected = [(p, q, vlm.ask(p, q, choices, max_new_tokens=NEW_TOKENS)) for p in inputs for q in QUESTIONS]
    got = rows(closed)
    assert [(r["input"], r["question"], r["output"]) for r in got] == expected
    assert got[0]["choices"] == dict(zip("ABCD", choices)) and len({r["id"] for r in got}) == 6


def test_zero_shot_gives_the_zero_shot_eval_probabilities(tiny_models, scans, tmp_path):
    from med3dvlm.data.ct_rate import ABNORMALITY_LABELS
    from med3dvlm.evaluation.zero_shot import ZeroShotScorer

    out = tmp_path / "labels.jsonl"
    predict(tmp_path, tiny_models.clip_checkpoint, scans, out, "task=zero_shot", "batch_size=3")
    model = med3dvlm.load_model(tiny_models.clip_checkpoint)
    expected = ZeroShotScorer()(model, model.embed_images(expected_inputs(scans)))
    got = rows(out)
    assert [row["input"] for row in got] == expected_inputs(scans)
    for row, reference in zip(got, expected):
        assert list(row["output"]) == list(ABNORMALITY_LABELS)
        assert row["output"] == pytest.approx(reference, abs=1e-5)


def test_a_task_the_model_cannot_do_is_a_usage_error(tiny_models, scans, tmp_path):
    with pytest.raises(ValueError, match="task=embed needs a stage-1 .* but model_dir is a VLM"):
        predict(tmp_path, tiny_models.vlm_dir, scans, tmp_path / "x.jsonl", "task=embed")
    with pytest.raises(InputSpecError, match="task=answer needs question="):
        predict(tmp_path, tiny_models.vlm_dir, scans, tmp_path / "x.jsonl", "task=answer")
    with pytest.raises(InputSpecError, match="belong to task=answer"):
        predict(tmp_path, tiny_models.vlm_dir, scans, tmp_path / "x.jsonl", "question=Why?")


def test_released_folders_run_as_released(tiny_models, tmp_path):
    """The released DCFormer_SigLIP and VLM folders (tests/test_interop.py writes tiny ones in the
    released layout): embeddings as the loaded model computes them, reports with the released
    caption prompt form (no space before the prompt, SPEC §5)."""
    interop = pytest.importorskip("test_interop")
    reference = interop.REFERENCE
    if not reference.exists():
        pytest.skip(f"reference file {reference} not present")
    released = json.loads(reference.read_text())
    from med3dvlm.api import model_input
    from med3dvlm.data.layout import CAPTION_PROMPT
    from med3dvlm.interop import load_released_clip, load_released_vlm

    volumes = tiny_models.volumes[:3]  # prepared (in [0, 1]): read as they are, no preprocessing needed
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path}\n" for path in volumes))
    clip_dir = tmp_path / "DCFormer_SigLIP"
    interop.write_released_clip(clip_dir, released)
    out = tmp_path / "embeddings.jsonl"
    predict(tmp_path, clip_dir, listing, out, "task=embed")
    clip = load_released_clip(clip_dir).model
    images = torch.stack([model_input(path, (16, 32, 32)) for path in volumes])
    with torch.no_grad():
        expected = clip.encode_image(images)
    torch.testing.assert_close(
        torch.from_numpy(read_matrix(out.with_suffix(".safetensors"))), expected, atol=1e-5, rtol=1e-4
    )

    vlm_dir = tmp_path / "Med3DVLM-Qwen"
    interop.write_released_vlm(vlm_dir, released)
    reports = tmp_path / "reports.jsonl"
    predict(tmp_path, vlm_dir, listing, reports, "task=report")
    vlm = load_released_vlm(vlm_dir)
    images = torch.stack([model_input(path, vlm.image_size) for path in volumes])
    answers = [
        vlm.answer(image[None], [CAPTION_PROMPT], tasks=["caption"], max_new_tokens=NEW_TOKENS)[0] for image in images
    ]
    assert [row["output"] for row in rows(reports)] == [answer.strip() for answer in answers]


# -- resume -------------------------------------------------------------------------------------------
def test_rerun_skips_what_is_done_and_recomputes_nothing(tiny_models, scans, tmp_path, monkeypatch):
    calls = CountingCalls(monkeypatch, ContrastiveModel, "encode_image")
    out = tmp_path / "embeddings.jsonl"
    predict(tmp_path, tiny_models.clip_dir, scans, out, "task=embed", "limit=3", "batch_size=2")
    first_rows, first_matrix = rows(out), read_matrix(out.with_suffix(".safetensors"))
    assert calls.volumes == 3 and len(first_rows) == 3

    summary = predict(tmp_path, tiny_models.clip_dir, scans, out, "task=embed", "batch_size=2")
    assert calls.volumes == 6  # only the three new volumes went through the encoder
    assert (summary.rows_before, summary.rows_written, summary.volumes_read) == (3, 3, 3)
    after = rows(out)
    assert after[:3] == first_rows  # untouched, timing included: nothing recomputed
    assert [row["input"] for row in after] == expected_inputs(scans) and [row["row"] for row in after] == list(range(6))
    matrix = read_matrix(out.with_suffix(".safetensors"))
    assert np.array_equal(matrix[:3], first_matrix) and matrix.shape[0] == 6

    summary = predict(tmp_path, tiny_models.clip_dir, scans, out, "task=embed", "batch_size=2")
    assert calls.volumes == 6 and summary.rows_written == 0 and rows(out) == after


def test_new_questions_are_answered_for_every_volume_the_old_ones_are_kept(tiny_models, scans, tmp_path, monkeypatch):
    calls = CountingCalls(monkeypatch, Med3DVLM, "answer")
    out = tmp_path / "answers.jsonl"
    inputs = f"{scans}/*.nii.gz"
    predict(tmp_path, tiny_models.vlm_dir, inputs, out, "task=answer", f"question={QUESTIONS[0]}")
    first = rows(out)
    assert calls.volumes == 1
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    predict(tmp_path, tiny_models.vlm_dir, inputs, out, "task=answer", f"questions=@{questions}")
    assert calls.volumes == 2  # the second question only (one volume, one generation call)
    after = rows(out)
    assert after[0] == first[0] and [(r["input"], r["question"]) for r in after] == [
        (os.path.abspath(scans / "a.nii.gz"), q) for q in QUESTIONS
    ]


def test_a_changed_model_or_setting_is_refused(tiny_models, scans, tmp_path):
    out = tmp_path / "reports.jsonl"
    predict(tmp_path, tiny_models.vlm_dir, scans, out, "limit=1")
    before = out.read_text()
    with pytest.raises(PredictionFileError, match=r"other settings \(generation differ"):
        predict(tmp_path, tiny_models.vlm_dir, scans, out, "limit=1", "max_new_tokens=5")
    with pytest.raises(PredictionFileError, match=r"other settings \(preprocessing differ"):
        predict(
            tmp_path,
            tiny_models.vlm_dir,
            scans,
            out,
            "limit=1",
            "preprocessing={hu_window: [-160, 240], shape: [16, 32, 32]}",
        )
    embeddings = tmp_path / "embeddings.jsonl"
    predict(tmp_path, tiny_models.clip_dir, scans, embeddings, "task=embed", "limit=1")
    with pytest.raises(PredictionFileError, match=r"other settings \(model, model_hash differ"):
        predict(tmp_path, tiny_models.clip_checkpoint, scans, embeddings, "task=embed", "limit=1")
    assert out.read_text() == before


# -- shards -------------------------------------------------------------------------------------------
def test_shards_merge_once_in_input_order(tmp_path):
    settings = {"task": "report", "model": "m"}
    output = PredictionOutput(tmp_path / "out.jsonl", settings)
    question = Question(None, "Describe.")
    pending = [PendingInput(i, f"/scans/{i}.nii", (question,)) for i in range(7)]
    shares = [share_of_rank(pending, rank, 3) for rank in range(3)]
    assert sorted(item.position for share in shares for item in share) == list(range(7))  # each once, no padding
    for rank, share in enumerate(shares):
        output.shard_writer(rank).write(
            {"id": item.path, "input": item.path, "output": str(item.position)} for item in share
        )
    with output.shard_path(1).open("a") as handle:
        handle.write('{"id": "/scans/torn"')  # a kill mid-write: left out, redone by the next run
    order = {item.path: item.position for item in pending}
    result = output.merge(order)
    assert [row["output"] for row in rows(output.out)] == [str(i) for i in range(7)]
    assert result.written == 7 and result.rows_per_rank == {0: 3, 1: 2, 2: 2} and not output.shard_dir.exists()

    for rank in (0, 1):
        output.shard_writer(rank).write([{"id": "/scans/new", "input": "/scans/new", "output": "x"}])
    with pytest.raises(MergeError, match="written by more than one rank"):
        output.merge(order)


# -- bad inputs -----------------------------------------------------------------------------------------
def test_bad_inputs_are_listed_and_the_rest_is_done(tiny_models, tmp_path):
    root = bad_scans(tiny_models, tmp_path / "scans")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(root.iterdir())) + "\nmissing.nii.gz\n")
    out = tmp_path / "embeddings.jsonl"
    summary = predict(tmp_path, tiny_models.clip_dir, listing, out, "task=embed", "num_workers=1", "batch_size=2")
    assert [row["input"] for row in rows(out)] == [str(root / "a.nii.gz"), str(root / "d.nii.gz")]
    reasons = {Path(record["input"]).name: record["reason"] for record in summary.bad}
    assert set(reasons) == {"b_corrupt.nii.gz", "c_two_series", "missing.nii.gz"}
    assert (
        reasons["b_corrupt.nii.gz"].startswith("CorruptFileError") and "b_corrupt.nii.gz" in reasons["b_corrupt.nii.gz"]
    )
    assert (
        reasons["c_two_series"].startswith("SeveralSeriesError") and "holds 2 image series" in reasons["c_two_series"]
    )
    assert "not found" in reasons["missing.nii.gz"]
    listed = rows(out.with_name(out.name + ".bad_inputs.jsonl"))
    assert {Path(r["input"]).name: r["reason"] for r in listed} == reasons
    assert "3 input(s) failed" in summary.text() and "c_two_series: SeveralSeriesError" in summary.text()

    (root / "b_corrupt.nii.gz").write_bytes((root / "a.nii.gz").read_bytes())  # the user fixes one file
    summary = predict(tmp_path, tiny_models.clip_dir, listing, out, "task=embed", "batch_size=2")
    assert summary.rows_written == 1 and len(summary.bad) == 2  # the fixed one is done, the others retried


def test_on_bad_input_error_stops_at_the_first_and_keeps_what_was_done(tiny_models, tmp_path, monkeypatch):
    calls = CountingCalls(monkeypatch, ContrastiveModel, "encode_image")
    root = bad_scans(tiny_models, tmp_path / "scans")
    out = tmp_path / "embeddings.jsonl"
    with pytest.raises(BadInputStop, match="b_corrupt.nii.gz: CorruptFileError"):
        predict(tmp_path, tiny_models.clip_dir, root, out, "task=embed", "batch_size=1", "on_bad_input=error")
    assert calls.volumes == 1 and not out.exists()  # a.nii.gz, in its rank's shard
    summary = predict(tmp_path, tiny_models.clip_dir, root, out, "task=embed", "batch_size=1")
    assert calls.volumes == 2 and summary.rows_before == 1 and summary.rows_written == 1  # d.nii.gz only
    assert [Path(row["input"]).name for row in rows(out)] == ["a.nii.gz", "d.nii.gz"]


# -- the command line ----------------------------------------------------------------------------------
def run_command(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "med3dvlm.predict",
        *arguments,
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "progress=false",
    ]
    return subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def test_exit_status_one_when_inputs_failed_two_for_mistakes(tiny_models, tmp_path):
    root = bad_scans(tiny_models, tmp_path / "scans")
    out = tmp_path / "out.jsonl"
    failed = run_command(
        tmp_path, f"model_dir={tiny_models.clip_dir}", f"inputs={root}", f"out={out}", "task=embed", "num_workers=0"
    )
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "2 input(s) failed" in failed.stdout and "b_corrupt.nii.gz: CorruptFileError" in failed.stdout
    assert len(rows(out)) == 2

    refused = run_command(tmp_path, f"model_dir={tiny_models.vlm_dir}", f"inputs={root}", f"out={out}", "task=report")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ") and "other settings" in refused.stderr


# -- the README ---------------------------------------------------------------------------------------
def readme_commands() -> list[list[str]]:
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Running a model over many scans", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python -m med3dvlm.predict "):
                commands.append(shlex.split(line, comments=True)[3:])
    return commands


def test_the_readme_commands_name_real_settings(tmp_path):
    from omegaconf import OmegaConf

    from med3dvlm.data.preprocessing import as_preprocessing

    tasks = set()
    for arguments in readme_commands():
        cfg = compose_config("predict", arguments, tmp_path)  # an unknown key or a bad value fails here
        assert cfg.out.endswith(".jsonl")
        tasks.add(cfg.task)
    assert tasks == {"report", "answer", "embed", "zero_shot"}
    cfg = compose_config(
        "predict",
        ["model_dir=m", "inputs=i", "out=o.jsonl", "preprocessing={hu_window: null, shape: [128, 256, 256]}"],
        tmp_path,
    )
    assert as_preprocessing(OmegaConf.to_container(cfg.preprocessing)).hu_window is None


def test_cpu_threads_leave_the_workers_their_cores():
    from med3dvlm.predicting.inputs import InputSpecError
    from med3dvlm.predicting.run import cpu_threads

    assert cpu_threads("auto", cores=2, num_workers=2, processes=1) == 1  # never below one
    assert cpu_threads("auto", cores=16, num_workers=2, processes=1) == 14
    assert cpu_threads("auto", cores=16, num_workers=2, processes=2) == 6  # each DDP process: 8 cores, 2 workers
    assert cpu_threads("auto", cores=4, num_workers=0, processes=1) == 4
    assert cpu_threads(3, cores=2, num_workers=2, processes=1) == 3
    assert cpu_threads(None, cores=2, num_workers=2, processes=1) is None
    for bad in (0, -1, "many"):
        with pytest.raises(InputSpecError, match="threads="):
            cpu_threads(bad, cores=2, num_workers=2, processes=1)
