"""experiments/rank_open_answers.py: scores against the model's own loss path, the prompt inverse, a run."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import load_experiment_script

from med3dvlm.data import layout

pytestmark = pytest.mark.slow  # a research script of experiments/: make test-slow


@pytest.fixture(scope="module")
def rank():
    return load_experiment_script("rank_open_answers")


def test_split_closed_prompt_inverts_closed_prompt():
    choices = {"A": "Portal venous phase", "B": "Axial", "C": "Left lobe. Upper part", "D": "No"}
    question = "Which phase? Or plane?"
    assert layout.split_closed_prompt(layout.closed_prompt(question, choices)) == (question, list(choices.values()))
    with pytest.raises(ValueError, match="not a closed-ended prompt"):
        layout.split_closed_prompt("Which plane is this?")


def test_scores_equal_the_summed_loss_of_the_training_path(rank, tiny_models):
    from med3dvlm.models.vlm import Med3DVLM, image_prompt

    vlm = Med3DVLM.from_pretrained(tiny_models.vlm_dir)
    image = torch.rand(1, *vlm.image_size, generator=torch.Generator().manual_seed(0))
    answers = ["Axial", "Portal venous phase"]
    with torch.no_grad():
        scores = rank.answer_log_likelihoods(vlm, image, "Which plane?", answers)
        for answer, score in zip(answers, scores):
            # the training loss path: prompt labels -100, mean cross-entropy over answer + EOS tokens
            prompt = image_prompt("Which plane?", vlm.num_image_tokens)
            prompt_ids = vlm.tokenizer(prompt)["input_ids"]
            ids = vlm.tokenizer(f"{prompt} {answer}")["input_ids"] + [vlm.tokenizer.eos_token_id]
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            out = vlm(
                image[None], torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([labels])
            )
            assert score == pytest.approx(-out.loss.item() * out.num_label_tokens, rel=1e-4, abs=1e-4)
    assert scores[0] != pytest.approx(scores[1])


def test_runs_on_a_tiny_vlm_and_phantoms(rank, tiny_models, tmp_path, capsys):
    root = tiny_models.data_root
    out = tmp_path / "rank.json"
    assert (
        rank.main([str(tiny_models.vlm_dir), str(root), "--split", "train", "--max-questions", "6", "--json", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["accuracy"]["overall"]["count"] == 6
    record = report["predictions"][0]
    assert record["correct"] == (max(record["scores"], key=record["scores"].get) == record["answer"][0])
    assert "top-ranked is right" in capsys.readouterr().out
