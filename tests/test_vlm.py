"""The VLM (SPEC §5): <im_patch> token, the splice, the loss, the collator and generation.

The model is the shipped `llm=tiny` config (real Qwen tokenizer, random Qwen2) shrunk to width 32.
"""

from __future__ import annotations

import os

import hydra
import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config, small_llm

from med3dvlm.models.llm import IMAGE_TOKEN, add_image_token_embeddings, load_language_model, load_tokenizer
from med3dvlm.models.vlm import (
    IGNORE_INDEX,
    Med3DVLM,
    image_prompt,
    left_align,
    pad_sequences,
    released_splice_image_features,
    splice_image_features,
)
from med3dvlm.stages.vlm import VLMCollator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_LLM = small_llm(layers=2)
QUESTIONS = [
    "Which plane is this CT image displayed in? Choices: A. Axial B. Coronal C. Sagittal D. Oblique",
    "What is the phase of this CT scan?",
    "Is there an abnormality in the liver?",
]


def compose_tiny_vlm_config(tmp_path, *overrides):
    return compose_config("train", ["experiment=pretrain", "debug=tiny", *CPU_TINY, *SMALL_LLM, *overrides], tmp_path)


@pytest.fixture(scope="module")
def vlm_config(tmp_path_factory):
    return compose_tiny_vlm_config(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="module")
def vlm(vlm_config):
    torch.manual_seed(0)
    model = hydra.utils.instantiate(vlm_config.model.model).eval()
    return model


def volumes(vlm, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, *vlm.image_size, generator=generator)


# -- the <im_patch> token ------------------------------------------------------------------------
def test_image_token_is_added_and_its_embedding_starts_at_the_mean(vlm_config):
    llm = dict(vlm_config.llm)
    tokenizer = load_tokenizer(**llm)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tokenizer.tokenize(IMAGE_TOKEN * 3) == [IMAGE_TOKEN] * 3  # one token per copy
    assert "<|im_start|>" in tokenizer.all_special_tokens  # the tokenizer's own specials are kept
    for vocab_size, grows in ((token_id, True), (token_id + 64, False)):  # no room / spare rows (as Qwen2.5)
        model = load_language_model(**llm, vocab_size=vocab_size)
        before = model.get_input_embeddings().weight.detach().clone()
        assert add_image_token_embeddings(model, tokenizer) == token_id
        after = model.get_input_embeddings().weight.detach()
        assert (after.shape[0] > before.shape[0]) == grows
        torch.testing.assert_close(after[token_id], before[:token_id].mean(0))
        torch.testing.assert_close(after[:token_id], before[:token_id])


# -- the splice ----------------------------------------------------------------------------------
def reference_splice(embeddings, input_ids, image_token_id, features):
    """Row by row, position by position: the k-th placeholder of row b gets features[b, k]."""
    out = embeddings.clone()
    for b in range(input_ids.shape[0]):
        k = 0
        for position, token in enumerate(input_ids[b].tolist()):
            if token == image_token_id:
                out[b, position] = features[b, k]
                k += 1
    return out


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_image_features_land_exactly_on_the_placeholders(vlm, bos, side):
    tokenizer = vlm.tokenizer
    bos_ids = [tokenizer.convert_tokens_to_ids("<|im_start|>")] if bos else []  # Qwen has no BOS: stand in
    rows = [bos_ids + tokenizer(image_prompt(q, vlm.num_image_tokens))["input_ids"] for q in QUESTIONS]
    input_ids, _ = pad_sequences(rows, tokenizer.pad_token_id, side=side)
    images = volumes(vlm, len(rows))
    with torch.no_grad():
        spliced = vlm.embed_inputs(input_ids, images)
        features = vlm.encode_images(images)
        plain = vlm.language_model.get_input_embeddings()(input_ids)
    assert features.shape == (3, vlm.num_image_tokens, 32)
    torch.testing.assert_close(
        spliced, reference_splice(plain, input_ids, vlm.image_token_id, features), rtol=0, atol=0
    )
    text = input_ids != vlm.image_token_id
    torch.testing.assert_close(spliced[text], plain[text], rtol=0, atol=0)  # everything else untouched
    assert not torch.equal(features[0], features[1])  # distinct volumes give distinct features


def test_splice_refuses_a_wrong_number_of_placeholders():
    embeddings, features = torch.zeros(2, 6, 4), torch.ones(2, 2, 4)
    ids = torch.tensor([[7, 9, 9, 1, 1, 1], [7, 9, 1, 1, 1, 1]])  # row 1 holds one placeholder, not two
    with pytest.raises(ValueError, match=r"exactly 2 .*\{1: 1\}"):
        splice_image_features(embeddings, ids, 9, features)


# -- the released splice (SPEC §5) ------------------------------------------------------------------
def reference_released_splice(embeddings, attention_mask, features):
    """The released formula, row by row on the unpadded sequence: keep token 0, write the N features
    over tokens 1..N, keep the rest."""
    out = embeddings.clone()
    for b in range(embeddings.shape[0]):
        real = attention_mask[b].nonzero().flatten().tolist()
        sequence = embeddings[b, real]
        spliced = torch.cat((sequence[:1], features[b], sequence[1 + features.shape[1] :]))
        out[b, real] = spliced
    return out


def released_twin(vlm, released_splice=True):
    """The same modules with the other splice."""
    return Med3DVLM(
        vlm.image_encoder, vlm.projector, vlm.language_model, vlm.tokenizer, vlm.image_size, vlm.projector_config,
        released_splice=released_splice,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("side", ["left", "right"])
def test_released_splice_writes_the_features_after_each_prompts_first_token(side):
    image_token, pad = 9, 0
    rows = [[9, 9, 9, 5, 6, 7], [9, 9, 9, 8]]  # placeholders first, as Qwen prompts (no BOS)
    input_ids, mask = pad_sequences(rows, pad, side=side)
    embeddings = torch.randn(2, input_ids.shape[1], 4, generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    got = released_splice_image_features(embeddings, input_ids, image_token, features, mask)
    torch.testing.assert_close(got, reference_released_splice(embeddings, mask, features), rtol=0, atol=0)
    first = mask.argmax(dim=1)
    for b in range(2):  # position 0 keeps the placeholder, the token after the placeholders is gone
        torch.testing.assert_close(got[b, first[b]], embeddings[b, first[b]], rtol=0, atol=0)
        torch.testing.assert_close(got[b, first[b] + 3], features[b, 2], rtol=0, atol=0)
    corrected = splice_image_features(embeddings, input_ids, image_token, features)
    assert not torch.equal(corrected, got)
    short, short_mask = pad_sequences([[9, 9, 9, 5], [9, 9, 9]], pad, side=side)
    with pytest.raises(ValueError, match=r"rows \[1\] hold fewer than 4 tokens"):
        released_splice_image_features(torch.zeros(2, 4, 4), short, image_token, features, short_mask)


def test_released_prompts_put_a_space_before_vqa_questions_only(vlm):
    released, tokenizer, n = released_twin(vlm), vlm.tokenizer, vlm.num_image_tokens
    caption = "Describe the findings of this medical image."
    ids, mask = released.tokenize_prompts([QUESTIONS[1], caption, QUESTIONS[1]], tasks=["vqa_open", "caption", None])
    rows = [ids[r][mask[r].bool()].tolist() for r in range(3)]
    assert rows[0] == rows[2] == tokenizer(IMAGE_TOKEN * n + " " + QUESTIONS[1])["input_ids"]
    assert rows[1] == tokenizer(IMAGE_TOKEN * n + caption)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(rows[0][n]) == "ĠWhat"
    plain_ids, _ = vlm.tokenize_prompts([QUESTIONS[1]], tasks=["vqa_open"])  # a model trained here: no space
    assert plain_ids[0].tolist() == tokenizer(image_prompt(QUESTIONS[1], n))["input_ids"]


def test_released_splice_applies_in_the_forward_and_in_generation(vlm):
    released = released_twin(vlm)
    tokenizer, n = vlm.tokenizer, vlm.num_image_tokens
    input_ids, mask = pad_sequences(
        [tokenizer(IMAGE_TOKEN * n + " " + q)["input_ids"] for q in QUESTIONS], tokenizer.pad_token_id
    )
    images = volumes(vlm, 3, seed=2)
    with torch.no_grad():
        plain = vlm.language_model.get_input_embeddings()(input_ids)
        expected_embeddings = reference_released_splice(plain, mask, vlm.encode_images(images))
        expected = vlm.language_model(inputs_embeds=expected_embeddings, attention_mask=mask).logits
        got = released(images, input_ids, mask).logits
        corrected = vlm(images, input_ids, mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    assert (corrected[real] - expected[real]).abs().max() > 1e-3  # the default splice differs
    prompts, prompt_mask = released.tokenize_prompts(QUESTIONS)  # left padded
    first = released.generate(images, prompts, prompt_mask, max_new_tokens=1, output_logits=True,
                              return_dict_in_generate=True).logits[0]  # fmt: skip
    last = mask.sum(dim=1) - 1
    torch.testing.assert_close(first, expected[torch.arange(3), last], rtol=1e-4, atol=1e-5)


def test_the_splice_flag_is_saved_and_restored(vlm, tmp_path):
    import json

    assert vlm.released_splice is False  # models built here use the corrected splice
    for flag in (False, True):
        folder = released_twin(vlm, released_splice=flag).save_pretrained(tmp_path / f"released_{flag}")
        assert json.loads((folder / "med3dvlm.json").read_text())["released_splice"] is flag
        assert Med3DVLM.from_pretrained(folder).released_splice is flag
    config = json.loads((folder / "med3dvlm.json").read_text())
    (folder / "med3dvlm.json").write_text(json.dumps({**config, "released_splice": "yes"}))
    with pytest.raises(ValueError, match=r"med3dvlm.json: released_splice must be true or false"):
        Med3DVLM.from_pretrained(folder)


def test_left_align_moves_right_padding_to_the_left():
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    new_ids, new_mask = left_align(ids, mask)
    assert new_ids.tolist() == [[0, 0, 5, 6], [5, 6, 7, 8]]
    assert new_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


# -- training text, labels and the loss -------------------------------------------------------
def collator_items(vlm, answers):
    images = volumes(vlm, len(answers))
    return [
        {
            "image": images[i],
            "prompt": q,
            "answer": a,
            "task": "vqa_closed",
            "question_type": "Plane",
            "answer_choice": "A",
            "source": f"test.csv:row {i + 2}",
        }
        for i, (q, a) in enumerate(zip(QUESTIONS, answers))
    ]


def test_collator_writes_prompt_space_answer_eos_with_prompt_labels_ignored(vlm_config, vlm):
    collator = VLMCollator(dict(vlm_config.llm), num_image_tokens=vlm.num_image_tokens)
    answers = ["A. Axial", "Portal venous phase", "Yes"]
    batch = collator(collator_items(vlm, answers) + [None])  # a skipped sample is dropped
    tokenizer = vlm.tokenizer
    assert batch["input_ids"].shape[0] == 3
    for row, (question, answer) in enumerate(zip(QUESTIONS, answers)):
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :length].tolist()
        labels = batch["labels"][row, :length].tolist()
        prompt = tokenizer(image_prompt(question, vlm.num_image_tokens))["input_ids"]
        assert ids == tokenizer(image_prompt(question, vlm.num_image_tokens) + " " + answer)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labels[len(prompt) : -1]).strip() == answer
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()  # padding is not learnt
        # the prompt alone, left-padded, for generation
        prompt_row = batch["prompt_ids"][row][batch["prompt_attention_mask"][row].bool()].tolist()
        assert prompt_row == prompt
    assert batch["prompt_attention_mask"][:, -1].all()


def test_collator_truncates_at_max_length_and_refuses_prompts_that_do_not_fit(vlm_config, vlm):
    prompt_length = len(vlm.tokenizer(image_prompt(QUESTIONS[1], vlm.num_image_tokens))["input_ids"])
    collator = VLMCollator(dict(vlm_config.llm), vlm.num_image_tokens, max_length=prompt_length + 2)
    batch = collator(collator_items(vlm, ["x", "the portal venous phase, with enhancing liver", "y"])[1:2])
    assert batch["input_ids"].shape[1] == prompt_length + 2
    assert (batch["labels"][0, prompt_length:] != IGNORE_INDEX).all()
    short = VLMCollator(dict(vlm_config.llm), vlm.num_image_tokens, max_length=prompt_length)
    with pytest.raises(ValueError, match=r"test.csv:row 3.*no room for the answer"):
        short(collator_items(vlm, ["x", "y", "z"])[1:2])


def test_loss_equals_the_llms_own_causal_lm_loss(vlm_config, vlm):
    batch = VLMCollator(dict(vlm_config.llm), vlm.num_image_tokens)(collator_items(vlm, ["A. Axial", "Arterial", "No"]))
    with torch.no_grad():
        ours = vlm(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        embeddings = vlm.embed_inputs(batch["input_ids"], batch["image"])
        reference = vlm.language_model(
            inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    torch.testing.assert_close(ours.loss, reference)
    assert ours.num_label_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# -- generation ----------------------------------------------------------------------------------
def strip_after_eos(tokens, eos, pad):
    out = []
    for token in tokens:
        if token == eos:
            out.append(token)
            break
        out.append(token)
    return [t for t in out if t != pad or t == eos]


def test_batched_greedy_generation_equals_one_by_one(vlm):
    images = volumes(vlm, 3, seed=1)
    tokenizer = vlm.tokenizer
    input_ids, mask = vlm.tokenize_prompts(QUESTIONS)
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padded, lengths differ
    batched = vlm.generate(images, input_ids, mask, max_new_tokens=6)
    right_ids, right_mask = pad_sequences(
        [tokenizer(image_prompt(q, vlm.num_image_tokens))["input_ids"] for q in QUESTIONS], tokenizer.pad_token_id
    )
    from_right_padding = vlm.generate(images, right_ids, right_mask, max_new_tokens=6)
    for row, question in enumerate(QUESTIONS):
        ids, row_mask = vlm.tokenize_prompts([question])
        single = vlm.generate(images[row : row + 1], ids, row_mask, max_new_tokens=6)[0].tolist()
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        assert strip_after_eos(batched[row].tolist(), eos, pad) == strip_after_eos(single, eos, pad)
        assert strip_after_eos(from_right_padding[row].tolist(), eos, pad) == strip_after_eos(single, eos, pad)
        # greedy means each new token is the argmax of the full forward pass (no cache involved)
        full = ids
        embeddings = vlm.embed_inputs(full, images[row : row + 1])
        with torch.no_grad():
            first = vlm.language_model(inputs_embeds=embeddings).logits[0, -1].argmax().item()
        assert single[0] == first


def test_answer_returns_text_per_question(vlm):
    answers = vlm.answer(volumes(vlm, 2), QUESTIONS[:2], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.slow
def test_smollm2_from_its_gguf_is_converted_once_and_knows_language(tmp_path, monkeypatch):
    """llm=smollm2_135m: the real pretrained SmolLM2-135M-Instruct from the pip package's GGUF."""
    from med3dvlm.models.llm import converted_gguf_folder

    monkeypatch.setenv("MED3DVLM_CACHE", str(tmp_path / "cache"))
    cfg = compose_config("train", ["experiment=pretrain", "debug=tiny", *CPU_TINY, "llm=smollm2_135m"], tmp_path)
    model = hydra.utils.instantiate(cfg.model.model).eval()
    folder = converted_gguf_folder(cfg.llm.name_or_path, cfg.llm.gguf_file)
    assert folder.parent == tmp_path / "cache" / "gguf" and (folder / "model.safetensors").exists()
    modified = (folder / "model.safetensors").stat().st_mtime_ns
    assert converted_gguf_folder(cfg.llm.name_or_path, cfg.llm.gguf_file) == folder  # cached, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == modified
    tokens = model.tokenizer("The capital of France is", return_tensors="pt")
    continuation = model.language_model.generate(**tokens, max_new_tokens=3, do_sample=False)
    assert "Paris" in model.tokenizer.decode(continuation[0, tokens["input_ids"].shape[1] :])
    assert len(model.answer(volumes(model, 1), ["Which organ is abnormal?"], max_new_tokens=2)) == 1
