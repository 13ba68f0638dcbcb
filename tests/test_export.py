"""LoRA (SPEC §5) and the export: targets, merged == unmerged, and save -> from_pretrained round trip."""

from __future__ import annotations

import json
import os

import hydra
import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config, small_llm
from torch import nn

import med3dvlm
from med3dvlm.models.vlm import VLM_CONFIG_FILE

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_LLM = small_llm(layers=2)


@pytest.fixture
def vlm(tmp_path):
    cfg = compose_config("train", ["experiment=finetune", "debug=tiny", *CPU_TINY, *SMALL_LLM], tmp_path)
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model.model).eval()


def inputs(vlm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, *vlm.image_size, generator=generator)
    input_ids, mask = vlm.tokenize_prompts(["Which organ contains the lesion?", "What is the phase?"])
    return images, input_ids, mask


def perturb_lora(vlm):
    """LoRA's B starts at zero (a no-op); give the adapters weight so merging has something to do."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in vlm.language_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_lora_wraps_every_linear_of_the_llm_except_the_lm_head(vlm):
    base = vlm.language_model
    linears = {name for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    expected = linears - {"lm_head"}
    assert expected and "lm_head" in linears
    vlm.add_lora(r=16, alpha=32, dropout=0.05)
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in vlm.language_model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }
    assert wrapped == expected
    config = vlm.language_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)  # SPEC §5


def test_merged_outputs_equal_unmerged_outputs(vlm):
    images, input_ids, mask = inputs(vlm)
    with torch.no_grad():
        base_logits = vlm(images, input_ids, mask).logits
    vlm.add_lora()
    perturb_lora(vlm)
    vlm.eval()
    with torch.no_grad():
        adapter_logits = vlm(images, input_ids, mask).logits
        assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapters do change the model
        vlm.merge_lora()
        assert not vlm.has_lora
        assert not any("lora" in name for name, _ in vlm.named_parameters())
        merged_logits = vlm(images, input_ids, mask).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)


def test_export_loads_back_with_one_call_and_gives_the_same_logits(vlm, tmp_path):
    vlm.add_lora()
    perturb_lora(vlm)
    with torch.no_grad():  # trained-looking encoder / projector / embeddings, not their init
        vlm.projector.low_mixer[0].ln1.weight.mul_(1.5)
        vlm.image_encoder.stages[0].convs[0].branches[0].norm.running_mean.add_(0.1)
    vlm.eval()
    images, input_ids, mask = inputs(vlm, seed=3)
    with torch.no_grad():
        before = vlm(images, input_ids, mask).logits
    generated_before = vlm.generate(images, input_ids, mask, max_new_tokens=4)

    folder = vlm.save_pretrained(tmp_path / "export")
    assert {"config.json", "model.safetensors", VLM_CONFIG_FILE, "vision.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert "auto_map" not in json.loads((folder / "config.json").read_text())  # no remote code

    loaded = med3dvlm.Med3DVLM.from_pretrained(folder)
    assert not loaded.training and not loaded.has_lora
    assert loaded.num_image_tokens == vlm.num_image_tokens
    assert loaded.image_token_id == vlm.image_token_id
    with torch.no_grad():
        after = loaded(images, input_ids, mask).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(loaded.generate(images, input_ids, mask, max_new_tokens=4), generated_before)


def test_from_pretrained_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="med3dvlm.json not found"):
        med3dvlm.Med3DVLM.from_pretrained(tmp_path)
