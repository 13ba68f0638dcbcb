"""experiments/closed_vqa_image_ablation.py: the swap and the scoring against stub models, and a run on a tiny VLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import load_experiment_script

from med3dvlm.data.samples import Sample

pytestmark = pytest.mark.slow  # a research script of experiments/: make test-slow


@pytest.fixture(scope="module")
def ablation():
    return load_experiment_script("closed_vqa_image_ablation")


def closed(path: str, letter: str, question_type: str = "Plane") -> Sample:
    return Sample(
        Path(path),
        "Which plane? Choices: A. a B. b C. c D. d",
        f"{letter}. x",
        "vqa_closed",
        f"{path}:{letter}",
        question_type,
        letter,
    )


def test_every_volume_is_swapped_with_another_case(ablation):
    paths = [Path(p) for p in ("a", "a", "b", "c", "b")]
    assert ablation.swap_partners(paths) == {Path("a"): Path("b"), Path("b"): Path("c"), Path("c"): Path("a")}
    with pytest.raises(SystemExit, match="only one volume"):
        ablation.swap_partners([Path("a"), Path("a")])


def test_a_model_that_reads_the_image_loses_its_answers_when_the_volume_is_swapped(ablation):
    # volume "a" holds the answer A, volume "b" the answer C; the stub reads the letter off the voxels
    samples = [
        closed("a", "A"),
        closed("b", "C"),
        closed("a", "A", "Phase"),
        closed("b", "C", "Phase"),
        closed("a", "A"),
    ]
    volumes = {Path("a"): torch.zeros(1, 2, 2, 2), Path("b"): torch.full((1, 2, 2, 2), 2.0)}

    def reads_image(images, questions):
        assert len(images) == len(questions)
        return [f"{'ABCD'[int(image.flatten()[0])]}. x" for image in images]

    report = ablation.ablation(samples, reads_image, volumes.__getitem__, batch_size=2, progress=False)
    assert report["own"]["accuracy"]["overall"] == {"accuracy": 1.0, "count": 5}
    assert report["swapped"]["accuracy"]["overall"] == {"accuracy": 0.0, "count": 5}
    assert report["own"]["accuracy"]["Phase"]["count"] == 2

    # a text-only model (always "A.") scores the same either way: 3 of 5 questions have the answer A
    report = ablation.ablation(samples, lambda images, qs: ["A. x"] * len(qs), volumes.__getitem__, progress=False)
    assert (
        report["own"]["accuracy"]["overall"]["accuracy"] == report["swapped"]["accuracy"]["overall"]["accuracy"] == 0.6
    )
    assert "| Plane | 66.67 | 66.67 | 3 |" in ablation.format_table(report)


def test_runs_on_a_tiny_vlm_and_phantoms(ablation, tiny_models, tmp_path, capsys):
    root = tiny_models.data_root
    out = tmp_path / "ablation.json"
    args = [str(tiny_models.vlm_dir), str(root), "--split", "train", "--max-questions", "10", "--json", str(out)]
    assert ablation.main([*args, "--max-new-tokens", "3"]) == 0
    report = json.loads(out.read_text())
    assert report["own"]["accuracy"]["overall"]["count"] == report["swapped"]["accuracy"]["overall"]["count"] == 10
    assert len(report["swapped"]["predictions"]) == 10
    assert "another case's volume" in capsys.readouterr().out
