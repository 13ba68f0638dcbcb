"""DCFormer and ViT3D against the SPEC's numbers and the released state-dict reference."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.models import DCFormer, ViT3D, build_encoder
from med3dvlm.models.dcformer import DecomposedConv3d, feature_map_to_tokens

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dicts.json"

# SPEC §2 table, "parameters" column, written out independently of the code.
SPEC_PARAMETER_COUNTS = {
    "nano": 789_216,
    "naive": 5_851_680,
    "tiny": 14_657_472,
    "small": 18_244_800,
    "base": 33_868_864,
}
SPEC_CHANNELS = {
    "nano": (32, 32, 64, 128, 256),
    "naive": (32, 64, 128, 256, 512),
    "tiny": (64, 96, 192, 384, 768),
    "small": (64, 96, 192, 384, 768),
    "base": (64, 128, 256, 512, 1024),
    "large": (64, 256, 512, 1024, 2048),
}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"reference file {REFERENCE} not present")
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("variant", sorted(SPEC_PARAMETER_COUNTS))
def test_parameter_count_matches_spec(variant):
    assert count_parameters(DCFormer(variant)) == SPEC_PARAMETER_COUNTS[variant]


def test_small_has_the_paper_parameter_count():
    assert count_parameters(DCFormer("small", in_channels=1)) == 18_244_800


@pytest.mark.parametrize("variant", sorted(SPEC_PARAMETER_COUNTS))
def test_state_dict_shapes_match_released_reference(variant, reference):
    released = reference[f"dcformer_{variant}"]
    assert released["num_params"] == SPEC_PARAMETER_COUNTS[variant]
    ours = Counter(tuple(t.shape) for t in DCFormer(variant).state_dict().values())
    theirs = Counter(tuple(shape) for shape in released["state_dict"].values())
    assert ours == theirs


@pytest.mark.parametrize("variant", sorted(SPEC_CHANNELS))
def test_stage_shapes_every_variant(variant):
    model = DCFormer(variant).eval()
    shape = (32, 64, 64)
    with torch.no_grad():
        outputs = model(torch.rand(2, 1, *shape))
    assert len(outputs) == 5
    # stem divides by 4, each later stage by 2 (SPEC §2)
    expected_grids = [(8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2), (1, 1, 1)]
    for out, grid, channels in zip(outputs, expected_grids, SPEC_CHANNELS[variant]):
        assert out.shape == (2, grid[0] * grid[1] * grid[2], channels)
    assert DCFormer.stage_grids(shape) == expected_grids


def test_small_token_grid_at_paper_resolution():
    """SPEC §2: 1×128×256×256 -> s3 = 256 tokens × 384, s4 = 32 tokens × 768."""
    model = DCFormer("small").eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 1, 128, 256, 256))
    assert [tuple(o.shape) for o in outputs] == [
        (1, 64 * 64 * 32, 64),
        (1, 32 * 32 * 16, 96),
        (1, 16 * 16 * 8, 192),
        (1, 256, 384),
        (1, 32, 768),
    ]


def test_tokens_are_depth_major():
    b, c, h, w, d = 1, 2, 3, 4, 5
    fmap = torch.arange(b * c * h * w * d, dtype=torch.float32).reshape(b, c, h, w, d)
    tokens = feature_map_to_tokens(fmap)
    for di in range(d):
        for hi in range(h):
            for wi in range(w):
                index = di * h * w + hi * w + wi
                assert torch.equal(tokens[0, index], fmap[0, :, hi, wi, di])


def test_model_tokens_index_the_released_layout_depth_major():
    """Stage tokens are the (B, C, H, W, D) feature map read depth-major, with unequal D, H, W."""
    model = DCFormer("nano").eval()
    captured = {}
    model.stages[2].register_forward_hook(lambda module, args, out: captured.update(fmap=out))
    x = torch.rand(1, 1, 32, 64, 96)  # D, H, W all different
    with torch.no_grad():
        tokens = model(x)[2]
    fmap = captured["fmap"]
    assert fmap.shape[2:] == (4, 6, 2)  # released layout (H, W, D) = (64/16, 96/16, 32/16)
    h, w, d = fmap.shape[2:]
    for di in range(d):
        for hi in range(h):
            for wi in range(w):
                assert torch.equal(tokens[0, di * h * w + hi * w + wi], fmap[0, :, hi, wi, di])


def test_decomposed_conv_equals_explicit_sum_of_three_axis_convs():
    torch.manual_seed(0)
    conv = DecomposedConv3d(3, 4, kernel_size=5, stride=2).eval()
    for branch in conv.branches:
        branch.norm.running_mean.uniform_(-1, 1)
        branch.norm.running_var.uniform_(0.5, 2)
        branch.norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 9, 10, 11)
    expected = 0
    for axis, branch in enumerate(conv.branches):
        padding = [0, 0, 0]
        padding[axis] = 2
        kernel_shape = [1, 1, 1]
        kernel_shape[axis] = 5
        assert tuple(branch.conv.weight.shape[2:]) == tuple(kernel_shape)
        y = F.conv3d(x, branch.conv.weight, branch.conv.bias, stride=2, padding=tuple(padding))
        norm = branch.norm
        y = (y - norm.running_mean.view(1, -1, 1, 1, 1)) / torch.sqrt(norm.running_var.view(1, -1, 1, 1, 1) + norm.eps)
        expected = expected + y * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_stem_has_no_activation_by_default():
    released = DCFormer("nano")
    assert not any(isinstance(m, torch.nn.GELU) for m in released.stages[0].modules())
    activated = DCFormer("nano", stem_activation=True)
    assert sum(isinstance(m, torch.nn.GELU) for m in activated.stages[0].modules()) == 4
    activated.load_state_dict(released.state_dict())
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(released.eval()(x)[0], activated.eval()(x)[0])


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = DCFormer("nano")
    checkpointed = DCFormer("nano", gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 32, 32, 32)
    plain(x)[-1].sum().backward()
    checkpointed(x)[-1].sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_unknown_variant_and_bad_input_are_clear():
    with pytest.raises(ValueError, match="unknown DCFormer variant"):
        DCFormer("huge")
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        DCFormer("nano")(torch.rand(1, 32, 32, 32))


def test_vit3d_contract_and_patch_order():
    torch.manual_seed(0)
    model = ViT3D(image_size=(32, 64, 64), patch_size=16, width=32, depth=1, heads=2, head_dim=8).eval()
    x = torch.rand(2, 1, 32, 64, 64)
    outputs = model(x)
    assert len(outputs) == 1 and outputs[0].shape == (2, 2 * 4 * 4, 32)
    patches = model.patchify(x)
    p = 16
    for di in range(2):
        for hi in range(4):
            for wi in range(4):
                block = x[0, 0, di * p : (di + 1) * p, hi * p : (hi + 1) * p, wi * p : (wi + 1) * p]
                expected = block.permute(1, 2, 0).reshape(-1)  # voxels in (H, W, D) order
                assert torch.equal(patches[0, di * 16 + hi * 4 + wi], expected)
    with pytest.raises(ValueError, match="built for volumes"):
        model(torch.rand(1, 1, 32, 32, 32))


def test_build_encoder_selects_by_name():
    assert isinstance(build_encoder("dcformer", variant="nano"), DCFormer)
    assert isinstance(build_encoder("vit3d", image_size=(32, 32, 32), depth=1), ViT3D)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("resnet")
