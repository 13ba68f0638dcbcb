"""The stage-1 pieces that are not the loss: report fitting (SPEC §3), collation, the model heads."""

from __future__ import annotations

import random

import pytest
import torch

from med3dvlm.models import build_encoder
from med3dvlm.models.contrastive import ContrastiveModel
from med3dvlm.stages.contrastive import fit_report_to_budget, split_sentences


def count_words(text: str) -> int:
    return len(text.split())


REPORT = "First finding here. Second one. Third sentence is longer than the rest. Fourth. Fifth short one."


def test_short_report_is_kept_whole():
    assert fit_report_to_budget(REPORT, count_words, 100) == REPORT


def test_long_report_keeps_first_sentence_then_others_while_they_fit():
    sentences = split_sentences(REPORT)
    assert len(sentences) == 5
    for seed in range(20):
        kept = fit_report_to_budget(REPORT, count_words, 8, random.Random(seed))
        kept_sentences = split_sentences(kept)
        assert kept_sentences[0] == sentences[0]  # the first sentence always stays
        assert count_words(kept) <= 8
        assert set(kept_sentences) <= set(sentences)
        # original order is preserved
        assert [sentences.index(s) for s in kept_sentences] == sorted(sentences.index(s) for s in kept_sentences)


def test_random_selection_varies_and_evaluation_is_deterministic():
    picks = {fit_report_to_budget(REPORT, count_words, 8, random.Random(seed)) for seed in range(30)}
    assert len(picks) > 1
    # without rng: sentences in order until one does not fit
    assert fit_report_to_budget(REPORT, count_words, 8) == "First finding here. Second one."


def test_contrastive_model_embeddings_follow_spec():
    class TinyText(torch.nn.Module):
        hidden_size = 6

        def forward(self, input_ids, attention_mask):
            return torch.nn.functional.one_hot(input_ids[:, 0], 6).float()

    encoder = build_encoder("dcformer", variant="nano")
    model = ContrastiveModel(encoder, TinyText(), embed_dim=768).eval()
    volume = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        image = model.encode_image(volume)
        expected = model.image_projection(encoder(volume)[-1].mean(dim=1))  # mean of last-stage tokens
    assert image.shape == (2, 768)
    assert torch.allclose(image, torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)
    text = model.encode_text(torch.tensor([[1, 0], [3, 0]]), torch.ones(2, 2))
    assert torch.allclose(text.norm(dim=-1), torch.ones(2))
