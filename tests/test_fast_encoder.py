"""FastDCFormer against its reference, the plain DCFormer in eval mode; the encoder speed options."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.encoders import SPEED_OPTIONS, apply_speed_options, build_encoder
from med3dvlm.models.fast_encoder import FastDCFormer, fold_batch_norm, optimize_for_inference
from med3dvlm.models.vit3d import ViT3D

RELATIVE_TOLERANCE = 1e-5  # the bar: equal to the plain eval module within 1e-5 relative


def trained_looking(model: DCFormer, seed: int = 0) -> DCFormer:
    """Random BatchNorm statistics and affine terms and O(1) layer scales, so that every folded term
    matters (a fresh DCFormer has identity BatchNorms and 1e-6 layer scales, which would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.5 + 0.25)
            elif name.endswith(".bias") and "norm" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def assert_outputs_equal(outputs, references) -> None:
    assert len(outputs) == len(references) == 5
    for out, ref in zip(outputs, references):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        scale = float(ref.abs().max())
        torch.testing.assert_close(out, ref, rtol=RELATIVE_TOLERANCE, atol=RELATIVE_TOLERANCE * scale)


@pytest.mark.parametrize(
    ("variant", "shape"),
    [
        ("nano", (1, 1, 16, 32, 32)),
        ("nano", (2, 1, 20, 28, 36)),  # batch of two; D != H != W
        ("small", (1, 1, 13, 29, 31)),  # odd sizes: padding and stride edge cases on every axis
        ("small", (2, 1, 8, 16, 24)),  # a 1-voxel-deep last grid, where depth taps have no neighbour
    ],
)
def test_fast_encoder_equals_plain_eval_module(variant, shape):
    torch.manual_seed(0)
    plain = trained_looking(DCFormer(variant)).eval()
    volume = torch.rand(*shape)
    with torch.no_grad():
        references = plain(volume)
    assert_outputs_equal(FastDCFormer.from_module(plain)(volume), references)


def test_fast_encoder_equals_plain_small_at_a_moderate_size():
    torch.manual_seed(1)
    plain = trained_looking(DCFormer("small"), seed=1).eval()
    volume = torch.rand(1, 1, 48, 96, 96)
    with torch.no_grad():
        references = plain(volume)
    assert_outputs_equal(FastDCFormer.from_module(plain)(volume), references)


def test_fast_encoder_with_stem_activation_and_from_a_module_in_train_mode():
    torch.manual_seed(2)
    plain = trained_looking(DCFormer("nano", stem_activation=True), seed=2)
    fast = FastDCFormer.from_module(plain.train())  # folds the running statistics, whatever the mode
    assert plain.training  # the source module is left as it was
    volume = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        references = plain.eval()(volume)
    assert_outputs_equal(fast(volume), references)


def test_fast_encoder_contract():
    plain = DCFormer("nano")
    fast = FastDCFormer.from_module(plain)
    assert list(fast.parameters()) == []  # frozen constants only
    assert fast.stage_channels == plain.stage_channels
    assert fast.stage_grids((16, 32, 32)) == plain.stage_grids((16, 32, 32))
    volume = torch.rand(1, 1, 16, 32, 32, requires_grad=True)
    outputs = fast(volume)
    assert not any(out.requires_grad for out in outputs)
    grids = plain.stage_grids((16, 32, 32))
    assert [tuple(out.shape) for out in outputs] == [
        (1, d * h * w, c) for (d, h, w), c in zip(grids, plain.stage_channels)
    ]
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        fast(torch.rand(1, 16, 32, 32))
    with pytest.raises(TypeError, match="needs a DCFormer"):
        FastDCFormer.from_module(ViT3D(image_size=(32, 32, 32), depth=1))


def test_fold_batch_norm_against_conv_then_norm():
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(4, 6, (1, 5, 1), padding=(0, 2, 0))
    norm = trained_looking(torch.nn.Sequential(torch.nn.BatchNorm3d(6)))[0].eval()
    x = torch.randn(2, 4, 5, 7, 3)
    weight, bias = fold_batch_norm(conv, norm)
    folded = F.conv3d(x, weight.float(), bias.float(), padding=(0, 2, 0))
    torch.testing.assert_close(folded, norm(conv(x)), rtol=1e-5, atol=1e-5)


def test_batch_norm_without_running_statistics_cannot_be_folded():
    plain = DCFormer("nano")
    plain.stages[0].convs[0].branches[0].norm = torch.nn.BatchNorm3d(32, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        FastDCFormer.from_module(plain)


def test_optimize_for_inference():
    plain = DCFormer("nano")
    assert isinstance(optimize_for_inference(plain), FastDCFormer)
    vit = ViT3D(image_size=(32, 32, 32), width=64, depth=1, heads=2, head_dim=32).train()
    optimised = optimize_for_inference(vit)
    assert optimised is not vit and not optimised.training and vit.training
    volume = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(optimised(volume)[0], vit.eval()(volume)[0])


# -- training-speed options of the encoder factory ---------------------------------------------------
def test_channels_last_keeps_names_and_outputs():
    torch.manual_seed(4)
    plain = build_encoder("dcformer", variant="nano")
    fast_layout = build_encoder("dcformer", variant="nano", channels_last=True)
    fast_layout.load_state_dict(plain.state_dict())  # same names; values copied into the channels-last weights
    first = fast_layout.stages[0].convs[0].branches[2].conv.weight  # one input channel: left alone
    assert first.stride() == first.contiguous().stride()
    refine = fast_layout.stages[0].convs[1].branches[0].conv.weight  # 32 -> 32 channels
    assert refine.is_contiguous(memory_format=torch.channels_last_3d) and not refine.is_contiguous()
    assert not any(key in fast_layout.build_config for key in SPEED_OPTIONS)  # not part of the export
    volume = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        assert_outputs_equal(fast_layout.eval()(volume), plain.eval()(volume))


def test_compile_option_compiles_in_place_without_renaming_parameters():
    plain = build_encoder("dcformer", variant="nano")
    compiled = apply_speed_options(copy.deepcopy(plain), compile=True)
    assert compiled._compiled_call_impl is not None  # nn.Module.compile: compiled lazily at the first call
    assert list(compiled.state_dict()) == list(plain.state_dict())
