"""The user API (``med3dvlm.load_model``): embeddings and retrieval against the stage-1 module itself,
answers against ``Med3DVLM.generate``, the stage-1 export round trip, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import med3dvlm
from med3dvlm.data.volumes import load_volume, save_volume

QUESTION = "Which organ has a lesion?"
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def clip(tiny_models):
    return med3dvlm.load_model(tiny_models.clip_dir)


@pytest.fixture(scope="module")
def vlm(tiny_models):
    return med3dvlm.load_model(tiny_models.vlm_dir)


@pytest.fixture(scope="module")
def reference_module(tiny_models):
    """The ContrastiveModule rebuilt by hand from the training checkpoint (not through the export)."""
    import hydra
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from med3dvlm.checkpoints import CONFIG_CHECKPOINT_KEY

    checkpoint = torch.load(tiny_models.clip_checkpoint, map_location="cpu", weights_only=True)
    cfg = OmegaConf.create(checkpoint[CONFIG_CHECKPOINT_KEY])
    module = hydra.utils.instantiate(cfg.model)
    module.load_state_dict(checkpoint["state_dict"])
    return module.model.eval(), AutoTokenizer.from_pretrained(cfg.text_encoder.name_or_path)


def reference_embeddings(reference_module, volumes, texts):
    model, tokenizer = reference_module
    with torch.no_grad():
        images = model.encode_image(torch.stack([torch.from_numpy(load_volume(v)) for v in volumes]))
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    return images, text


def cosine(a, b):
    return (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T)


# -- stage 1 ---------------------------------------------------------------------------------------
def test_export_folder_is_self_contained(tiny_models):
    names = {p.name for p in tiny_models.clip_dir.iterdir()}
    assert {"med3dvlm_clip.json", "model.safetensors", "text_encoder"} <= names
    text_files = {p.name for p in (tiny_models.clip_dir / "text_encoder").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= text_files


def test_retrieval_equals_cosine_of_the_checkpoint_module(clip, reference_module, tiny_models):
    volumes, texts = tiny_models.volumes[:4], tiny_models.reports[:4] + ["A normal abdomen."]
    images, text = reference_embeddings(reference_module, volumes, texts)
    similarity = cosine(images, text)  # (volumes, texts)

    torch.testing.assert_close(clip.embed_images(volumes), images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip.embed_texts(texts), text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clip.similarity(volumes[1], texts), similarity[1], rtol=1e-5, atol=1e-5)

    matches = clip.retrieve_texts(volumes[1], texts, k=3)
    expected = torch.argsort(similarity[1], descending=True)[:3].tolist()
    assert [m.index for m in matches] == expected
    assert [m.label for m in matches] == [texts[i] for i in expected]
    assert [m.score for m in matches] == pytest.approx(similarity[1, expected].tolist(), abs=1e-5)

    matches = clip.retrieve_volumes(texts[2], volumes, k=10)  # k above the count: all, ranked
    expected = torch.argsort(similarity[:, 2], descending=True).tolist()
    assert [m.index for m in matches] == expected
    assert matches[0].label == str(volumes[expected[0]])


def test_a_long_text_is_embedded_as_the_evaluation_collator_reads_it(clip, reference_module):
    from med3dvlm.stages.contrastive import ContrastiveCollator

    model, tokenizer = reference_module
    report = " ".join(f"Finding number {i} is a small hypodense lesion in segment {i % 8}." for i in range(40))
    assert len(tokenizer(report)["input_ids"]) > clip.max_text_tokens == 128
    collator = ContrastiveCollator(tokenizer.name_or_path, max_length=128, train=False)
    batch = collator([{"image": np.zeros((1, 2, 2, 2), np.float32), "answer": report, "source": "long"}])
    assert batch["text"][0] != report and batch["text"][0].startswith("Finding number 0 ")
    with torch.no_grad():
        expected = model.encode_text(batch["input_ids"], batch["attention_mask"])[0]
    torch.testing.assert_close(clip.embed_text(report), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_and_export_give_the_same_embeddings(clip, tiny_models):
    from_checkpoint = med3dvlm.load_model(tiny_models.clip_checkpoint)
    assert isinstance(from_checkpoint, med3dvlm.RetrievalModel)
    assert from_checkpoint.image_size == clip.image_size == (16, 32, 32)
    volume, text = tiny_models.volumes[0], tiny_models.reports[0]
    assert torch.equal(from_checkpoint.embed_image(volume), clip.embed_image(volume))
    assert torch.equal(from_checkpoint.embed_text(text), clip.embed_text(text))


def test_export_command_writes_a_stage1_folder(tiny_models, tmp_path, capsys):
    from med3dvlm.export import main

    assert main([f"ckpt_path={tiny_models.clip_checkpoint}", f"out_dir={tmp_path / 'out'}"]) == 0
    assert "stage-1 (retrieval) model written" in capsys.readouterr().out
    assert (tmp_path / "out" / "med3dvlm_clip.json").is_file()


def test_a_volume_is_a_path_an_array_or_a_tensor_and_is_brought_to_the_model(clip, tiny_models):
    path = tiny_models.volumes[0]
    array = load_volume(path)  # (1, D, H, W) in [0, 1]
    by_path = clip.embed_image(path)
    torch.testing.assert_close(clip.embed_image(array[0]), by_path)
    torch.testing.assert_close(clip.embed_image(torch.from_numpy(array)), by_path)
    # values outside [0, 1] are raw HU: the recorded preprocessing (the phantoms' window -1000..1000 HU)
    # maps them back onto the phantom, by the window's formula, not by min and max
    assert clip.preprocessing.hu_window == (-1000.0, 1000.0)
    hounsfield = array * 2000.0 - 1000.0
    torch.testing.assert_close(clip.embed_image(hounsfield), by_path, rtol=1e-4, atol=1e-5)
    min_max = (array - array.min()) / (array.max() - array.min())
    assert not torch.allclose(clip.embed_image(min_max), by_path, atol=1e-5)  # min-max would differ
    # another size is resized trilinearly to the model's (16, 32, 32)
    small = torch.rand(1, 1, 8, 16, 24, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(small, size=(16, 32, 32), mode="trilinear", align_corners=False)
    with torch.no_grad():
        expected = clip.model.encode_image(resized)[0]
    torch.testing.assert_close(clip.embed_image(small[0]), expected, rtol=1e-5, atol=1e-5)


def test_bad_volumes_and_model_paths_are_named(clip, tmp_path):
    with pytest.raises(ValueError, match="missing.nii.gz"):
        clip.embed_image(tmp_path / "missing.nii.gz")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        clip.embed_image(broken)
    with pytest.raises(ValueError, match="NaN"):
        clip.embed_image(np.full((4, 4, 4), np.nan))
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        clip.embed_image(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="k must be"):
        clip.retrieve_texts(np.zeros((4, 4, 4)), ["a"], k=0)
    with pytest.raises(FileNotFoundError, match="med3dvlm.json"):
        med3dvlm.load_model(tmp_path)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        med3dvlm.load_model(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        med3dvlm.load_model(tmp_path / "nowhere")


# -- the VLM ---------------------------------------------------------------------------------------
def reference_answer(model, volume_path, prompt):
    """Greedy decoding with the model class itself, on the volume as the data pipeline reads it."""
    images = torch.from_numpy(load_volume(volume_path)).unsqueeze(0)
    input_ids, mask = model.tokenize_prompts([prompt])
    new_tokens = model.generate(images, input_ids, mask, max_new_tokens=MAX_NEW_TOKENS)
    return model.tokenizer.decode(new_tokens[0], skip_special_tokens=True).strip()


def test_ask_and_describe_equal_generate_on_the_training_prompts(vlm, tiny_models):
    assert isinstance(vlm, med3dvlm.VisionLanguageModel)
    volume = tiny_models.volumes[0]
    closed = f"{QUESTION} Choices: A. Liver B. Spleen C. Left kidney D. Pancreas"  # SPEC §6, written out
    cases = [
        (vlm.ask(volume, QUESTION, max_new_tokens=MAX_NEW_TOKENS), QUESTION),
        (vlm.ask(volume, QUESTION, ["Liver", "Spleen", "Left kidney", "Pancreas"], MAX_NEW_TOKENS), closed),
        (
            vlm.ask(
                volume, QUESTION, dict(zip("abcd", ["Liver", "Spleen", "Left kidney", "Pancreas"])), MAX_NEW_TOKENS
            ),
            closed,
        ),
        (vlm.describe(volume, max_new_tokens=MAX_NEW_TOKENS), "Describe the findings of this medical image."),
    ]
    model = med3dvlm.Med3DVLM.from_pretrained(tiny_models.vlm_dir)
    for answer, prompt in cases:
        assert answer == reference_answer(model, volume, prompt)
    assert cases[0][0]  # the random tiny model does say something


def test_vlm_embed_image_is_the_projector_output(vlm, tiny_models):
    images = torch.from_numpy(load_volume(tiny_models.volumes[1])).unsqueeze(0)
    with torch.no_grad():
        expected = vlm.model.encode_images(images)[0]
    tokens = vlm.embed_image(tiny_models.volumes[1])
    assert tokens.shape == (vlm.model.num_image_tokens, 32)
    torch.testing.assert_close(tokens, expected)


def test_ask_rejects_what_the_model_was_not_trained_on(vlm, tmp_path):
    volume = np.zeros((16, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="four answers"):
        vlm.ask(volume, QUESTION, choices=["Liver", "Spleen"])
    with pytest.raises(ValueError, match="empty"):
        vlm.ask(volume, "  ")
    with pytest.raises(ValueError, match="scan.npy"):
        save_volume(np.zeros((4, 4, 4)), tmp_path / "scan.npy").write_bytes(b"garbage")
        vlm.ask(tmp_path / "scan.npy", QUESTION)
