"""``python -m med3dvlm.demo``: what it prints for a VLM and a stage-1 model, and how it refuses."""

from __future__ import annotations

import sys

import pytest

import med3dvlm
from med3dvlm.demo import main

QUESTION = "Which organ has a lesion?"


def run_demo(capsys, *arguments):
    status = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_vlm_answers_the_question_as_the_api_does(tiny_models, capsys):
    volume = tiny_models.volumes[0]
    expected = med3dvlm.load_model(tiny_models.vlm_dir).ask(volume, QUESTION, max_new_tokens=10)
    status, out, _ = run_demo(
        capsys, f"model_dir={tiny_models.vlm_dir}", f"image={volume}", f"question={QUESTION}", "max_new_tokens=10"
    )
    assert status == 0
    assert out.splitlines() == [f"question: {QUESTION}", f"answer: {expected}"]

    status, out, _ = run_demo(
        capsys, f"model_dir={tiny_models.vlm_dir}", f"image={volume}", f"question={QUESTION}",
        "choices=Liver|Spleen|Left kidney|Pancreas", "max_new_tokens=4",
    )  # fmt: skip
    assert status == 0
    assert out.startswith(f"question: {QUESTION} Choices: A. Liver B. Spleen C. Left kidney D. Pancreas\nanswer: ")


def test_stage1_model_ranks_the_texts_as_the_api_does(tiny_models, capsys, tmp_path):
    volume = tiny_models.volumes[1]
    texts = tiny_models.reports[:3]
    expected = med3dvlm.load_model(tiny_models.clip_dir).retrieve_texts(volume, texts + [QUESTION], k=2)
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(texts) + "\n\n")
    status, out, _ = run_demo(
        capsys, f"model_dir={tiny_models.clip_dir}", f"image={volume}", f"texts=@{listing}", "k=2",
        f"question={QUESTION}",
    )  # fmt: skip
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "image -> text retrieval, top 2 of 4 texts (cosine similarity):"
    assert lines[1:] == [f"{rank:>3}. {m.score:+.4f}  {m.label}" for rank, m in enumerate(expected, start=1)]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["image=x.nii.gz"], "model_dir is required"),
        (["model_dir=m", "image=x.nii.gz", "colour=red"], "unknown key 'colour'"),
        (["model_dir=m", "image=x.nii.gz", "k=many"], "k='many'"),
        (["model_dir={vlm}", "image={tmp}/absent.nii.gz"], "absent.nii.gz: volume file not found"),
        (["model_dir={tmp}", "image={volume}"], "holds neither med3dvlm.json"),
        (["model_dir={vlm}", "image={tmp}/broken.nii.gz", "question=Why?"], "broken.nii.gz: cannot read NIfTI"),
        (["model_dir={vlm}", "image={volume}", "question=Why?", "choices=a|b"], "choices must be four answers"),
        (["model_dir={clip}", "image={volume}"], "stage-1 (retrieval) model"),
    ],
)
def test_user_errors_exit_with_status_2_and_a_message(tiny_models, tmp_path, capsys, arguments, message):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    paths = dict(vlm=tiny_models.vlm_dir, clip=tiny_models.clip_dir, volume=tiny_models.volumes[0], tmp=tmp_path)
    status, out, err = run_demo(capsys, *[argument.format(**paths) for argument in arguments])
    assert status == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_runs_as_a_module(tiny_models, monkeypatch, capsys):
    import runpy

    volume = tiny_models.volumes[0]
    arguments = [f"model_dir={tiny_models.clip_dir}", f"image={volume}", "texts=Lesion.|No lesion.", "k=1"]
    monkeypatch.setattr(sys, "argv", ["med3dvlm.demo", *arguments])
    monkeypatch.delitem(sys.modules, "med3dvlm.demo")  # run it fresh, as `python -m` does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("med3dvlm.demo", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("image -> text retrieval, top 1 of 2 texts")
