"""experiments/diagnose_image_tokens.py: its statistics against hand computations, and a run on a tiny VLM."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import load_experiment_script

pytestmark = pytest.mark.slow  # a research script of experiments/: make test-slow


@pytest.fixture(scope="module")
def diagnose():
    return load_experiment_script("diagnose_image_tokens")


def test_variation_is_std_norm_over_mean_norm(diagnose):
    tokens = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]])  # two volumes, one token of width 2
    # per position: mean (2, 2), sample std (sqrt(2), 0)
    assert diagnose.between_volume_variation(tokens) == pytest.approx(2**0.5 / 8**0.5)
    assert diagnose.between_volume_variation(torch.ones(5, 3, 4)) == 0.0


def test_nearest_centroid_leave_one_out(diagnose):
    separable = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    assert diagnose.nearest_centroid_accuracy(separable, list("aaabbb")) == 1.0
    # labels alternate along a line: leaving a point out moves its own centroid away, every point is wrong
    # (0 out: a = {3} at 3, b = {1, 4} at 2.5 -> b; 1 out: a = 1.5 at 0.5, b = {4} at 3 -> a; and so on)
    assert diagnose.nearest_centroid_accuracy(torch.tensor([[0.0], [1.0], [3.0], [4.0]]), list("abab")) == 0.0
    # a class seen once is skipped, not scored
    assert diagnose.nearest_centroid_accuracy(separable[:4], list("aaab")) == 1.0


def test_runs_on_a_tiny_vlm_and_phantoms(diagnose, tiny_models, tmp_path, capsys):
    root = tiny_models.data_root
    out = tmp_path / "report.json"
    assert diagnose.main([str(tiny_models.vlm_dir), str(root), "--split", "train", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["variation"]) == {"s3", "s4", "projector"}
    assert report["decodable"] and all(0.0 <= row["nearest_centroid"] <= 1.0 for row in report["decodable"].values())
    assert "nearest-centroid LOO accuracy" in capsys.readouterr().out
