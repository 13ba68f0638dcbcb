"""Training-speed options (issue #9, README "Speed"): each is a documented Hydra override, and each is
shown to take effect: the encoder's ``channels_last`` / ``compile`` / ``gradient_checkpointing``, bf16
autocast (``trainer.precision=bf16-mixed``) through DCFormer on a CPU, and the LLM's
``llm.gradient_checkpointing`` (same loss and gradients as without)."""

from __future__ import annotations

import os

import hydra
import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config, small_llm

import med3dvlm.models.dcformer as dcformer_module
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.encoders import SPEED_OPTIONS
from med3dvlm.models.llm import is_gradient_checkpointing

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_LLM = small_llm(layers=2)


def stage1_encoder(tmp_path, *overrides):
    cfg = compose_config("train", ["experiment=siglip", "debug=tiny", *CPU_TINY, *overrides], tmp_path)
    return hydra.utils.instantiate(cfg.model).model.image_encoder


def vlm_stage(tmp_path, experiment, *overrides):
    cfg = compose_config(
        "train", [f"experiment={experiment}", "debug=tiny", *CPU_TINY, *SMALL_LLM, *overrides], tmp_path
    )
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model)


def conv_weights(encoder):
    return [m.weight for m in encoder.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1]


# -- encoder options through the configs ---------------------------------------------------------------
def test_every_encoder_config_declares_the_speed_options(tmp_path):
    for encoder in ("dcformer_nano", "dcformer_tiny", "dcformer_small", "dcformer_base", "vit3d"):
        cfg = compose_config("train", [f"encoder={encoder}"], tmp_path)
        assert cfg.encoder.channels_last is False and cfg.encoder.compile is False, encoder
        if encoder.startswith("dcformer"):
            assert cfg.encoder.gradient_checkpointing is False


def test_defaults_leave_the_encoder_plain(tmp_path):
    encoder = stage1_encoder(tmp_path)
    assert all(w.is_contiguous() for w in conv_weights(encoder))
    assert encoder._compiled_call_impl is None and not encoder.gradient_checkpointing


@pytest.mark.parametrize("experiment", ["siglip", "finetune"])
def test_channels_last_override_reaches_the_encoder(tmp_path, experiment):
    if experiment == "siglip":
        encoder = stage1_encoder(tmp_path, "encoder.channels_last=true")
    else:
        encoder = vlm_stage(tmp_path, experiment, "encoder.channels_last=true").model.image_encoder
    weights = conv_weights(encoder)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    assert any(not w.is_contiguous() for w in weights)  # (depthwise (C, 1, 1, 1, k) weights are both)
    assert not any(key in encoder.build_config for key in SPEED_OPTIONS)  # not recorded in the export


@pytest.mark.parametrize("experiment", ["siglip", "pretrain"])
def test_compile_override_compiles_the_encoder_in_place(tmp_path, experiment):
    if experiment == "siglip":
        encoder = stage1_encoder(tmp_path, "encoder.compile=true")
    else:
        encoder = vlm_stage(tmp_path, experiment, "encoder.compile=true").model.image_encoder
    assert encoder._compiled_call_impl is not None  # compiled lazily at the first call
    assert all(not name.startswith("_orig_mod.") for name in encoder.state_dict())
    assert not any(key in encoder.build_config for key in SPEED_OPTIONS)


def test_encoder_gradient_checkpointing_override_checkpoints_every_stage(tmp_path, monkeypatch):
    encoder = stage1_encoder(tmp_path, "encoder.gradient_checkpointing=true").train()
    assert encoder.gradient_checkpointing
    calls = []
    original = dcformer_module.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(function, *args, **kwargs)

    monkeypatch.setattr(dcformer_module, "checkpoint", counting)
    outputs = encoder(torch.rand(2, 1, 16, 32, 32))
    assert calls == [False] * 5  # one non-reentrant checkpoint per stage
    sum(o.sum() for o in outputs).backward()
    calls.clear()
    with torch.no_grad():
        encoder(torch.rand(2, 1, 16, 32, 32))
    assert calls == []  # nothing to save without gradients


def test_released_encoder_factory_accepts_the_speed_options(tmp_path):
    """The interop factory gets the encoder config's keys too (`encoder._target_=...released_dcformer_encoder`)."""
    from safetensors.torch import save_file

    from med3dvlm.interop import dcformer_to_released

    torch.manual_seed(0)
    weights = tmp_path / "stage1.safetensors"
    save_file(
        {f"vision_encoder.{k}": v for k, v in dcformer_to_released(DCFormer("nano").state_dict()).items()}, str(weights)
    )
    cfg = compose_config(
        "train",
        [
            "encoder=dcformer_nano",
            "encoder._target_=med3dvlm.interop.released_dcformer_encoder",
            f"+encoder.path={weights}",
            "encoder.channels_last=true",
        ],
        tmp_path,
    )
    encoder = hydra.utils.instantiate(cfg.encoder)
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights(encoder))
    assert not any(key in encoder.build_config for key in SPEED_OPTIONS)


# -- bf16 autocast --------------------------------------------------------------------------------
def bf16_mixed_context():
    """The autocast region Lightning opens for ``trainer.precision=bf16-mixed`` on a CPU."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("bf16-mixed", "cpu").forward_context()


def test_dcformer_trains_under_bf16_autocast_on_cpu_close_to_fp32():
    """torch 2.13's CPU bf16 conv3d corrupts the heap on DCFormer's first convolution (one input channel,
    stride 4, (1, 1, 7) kernel); DCFormer runs that one in fp32. Before the fix this crashed the process
    within a few steps; now forward + backward run repeatedly and agree with fp32."""
    torch.manual_seed(0)
    model = DCFormer("nano").train()
    volume = torch.rand(2, 1, 16, 32, 32)
    outputs = model(volume)
    sum(o.float().pow(2).mean() for o in outputs).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    dtypes = {}
    model.stages[0].convs[0].branches[2].conv.register_forward_hook(lambda m, i, o: dtypes.update(first=o.dtype))
    model.stages[1][0].proj.register_forward_hook(lambda m, i, o: dtypes.update(later=o.dtype))
    for _ in range(20):  # the bug showed within tens of calls
        model.zero_grad()
        with bf16_mixed_context():
            bf16_outputs = model(volume)
        sum(o.float().pow(2).mean() for o in bf16_outputs).backward()
    # the other convolutions run in bf16 (the first one, with its (1, 1, 7) kernel, in fp32, bypassing its hook)
    assert dtypes == {"later": torch.bfloat16}
    for fp32, bf16 in zip(outputs, bf16_outputs):
        assert torch.linalg.norm(bf16.float() - fp32) <= 0.02 * torch.linalg.norm(fp32)
    grads = {name: parameter.grad.float() for name, parameter in model.named_parameters()}
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    # bf16 keeps ~3 significant digits, and train-mode BatchNorm makes the weight gradients small differences
    # of large terms (the conv biases' are ~0 in both), so compare the whole gradient's direction
    flat, flat_reference = (torch.cat([g[n].flatten() for n in reference]) for g in (grads, reference))
    assert torch.nn.functional.cosine_similarity(flat, flat_reference, dim=0) > 0.97


def test_dcformer_runs_with_bf16_weights_on_cpu():
    """A model cast to bf16 (e.g. ``Med3DVLM.from_pretrained(dtype="bfloat16")`` on a CPU) takes the same fp32 path."""
    torch.manual_seed(0)
    model = DCFormer("nano").eval()
    volume = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        reference = model(volume)
        model.bfloat16()
        for _ in range(20):
            outputs = model(volume.bfloat16())
    assert outputs[-1].dtype == torch.bfloat16
    for fp32, bf16 in zip(reference, outputs):
        assert torch.linalg.norm(bf16.float() - fp32) <= 0.05 * torch.linalg.norm(fp32)


def test_bf16_precision_override(tmp_path):
    cfg = compose_config("train", ["experiment=siglip", "trainer.precision=bf16-mixed"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"  # overrides strategy=single's fp32 fallback on a CPU


# -- LLM gradient checkpointing -------------------------------------------------------------------
def training_batch(model, count=2):
    from med3dvlm.models.vlm import IGNORE_INDEX, image_prompt, pad_sequences

    rows, labels = [], []
    for i in range(count):
        prompt = model.tokenizer(image_prompt(f"Question {i}?", model.num_image_tokens))["input_ids"]
        answer = model.tokenizer(f" Answer number {i}.")["input_ids"] + [model.tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    input_ids, mask = pad_sequences(rows, model.tokenizer.pad_token_id)
    targets, _ = pad_sequences(labels, IGNORE_INDEX)
    images = torch.rand(count, 1, *model.image_size, generator=torch.Generator().manual_seed(0))
    return images, input_ids, mask, targets


def test_llm_gradient_checkpointing_is_off_by_default_in_every_llm_config(tmp_path):
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "llm").glob("*.yaml")):
        cfg = compose_config("train", ["experiment=pretrain", f"llm={path.stem}"], tmp_path)
        assert cfg.llm.gradient_checkpointing is False, path.stem


def test_llm_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    plain = vlm_stage(tmp_path / "a", "finetune")
    checkpointed = vlm_stage(tmp_path / "b", "finetune", "llm.gradient_checkpointing=true")
    assert not is_gradient_checkpointing(plain.model.language_model)
    assert is_gradient_checkpointing(checkpointed.model.language_model)  # through the LoRA wrapper
    assert checkpointed.model.base_language_model().is_activation_checkpointing  # transformers' own flag
    checkpointed.model.load_state_dict(plain.model.state_dict())  # same weights (also the encoder's)
    batch = training_batch(plain.model)
    results = []
    for stage in (plain, checkpointed):
        stage.train()
        torch.manual_seed(1)  # LoRA dropout: the same masks (checkpointing replays the RNG state)
        loss = stage.model(*batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in stage.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and any("lora_" in n for n in grads_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_llm_gradient_checkpointing_recomputes_the_decoder_layers(tmp_path):
    """The layers are really checkpointed in training: backward recomputes each layer's MLP."""
    for checkpointing, runs in ((False, 1), (True, 2)):
        stage = vlm_stage(tmp_path, "finetune", f"llm.gradient_checkpointing={str(checkpointing).lower()}")
        stage.train()
        layers = stage.model.base_language_model().get_decoder().layers
        calls = []
        for layer in layers:
            layer.mlp.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        stage.model(*training_batch(stage.model)).loss.backward()
        assert len(calls) == runs * len(layers), checkpointing
