"""Projectors (SPEC §4): the paper's Mixer against the released parameter list and a written-out
reference computation; every projector's shapes and token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from med3dvlm.models import MixerProjector, build_projector
from med3dvlm.models.projectors import PROJECTORS

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dicts.json"
PAPER_WIDTH = 3584  # Qwen2.5-7B


def paper_mixer(device: str = "cpu") -> MixerProjector:
    with torch.device(device):
        return MixerProjector(
            low_input_size=(256, 384),
            low_output_size=(192, 128),
            high_input_size=(32, 768),
            high_output_size=(64, 128),
            output_dim=PAPER_WIDTH,
            depth=2,
            mlp_depth=2,
        )


def test_paper_mixer_has_the_papers_parameter_count():
    mixer = paper_mixer("meta")
    assert sum(p.numel() for p in mixer.parameters()) == 47_221_248  # SPEC §4
    assert mixer.num_tokens == 256


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference files not present")
def test_paper_mixer_matches_the_released_parameter_names_and_shapes():
    released = json.loads(REFERENCE.read_text())["mixer_projector_qwen2.5_7b"]
    ours = {name: list(t.shape) for name, t in paper_mixer("meta").state_dict().items()}
    assert ours == released["state_dict"]
    assert sum(torch.Size(s).numel() for s in ours.values()) == released["num_params"]


def reference_mlp(x, weights, prefix):
    """Linear, then (GELU, Linear) pairs, read from the released names."""
    x = F.linear(x, weights[f"{prefix}.mm_projector.0.weight"], weights[f"{prefix}.mm_projector.0.bias"])
    index = 1
    while f"{prefix}.mm_projector.{index}.1.weight" in weights:
        w, b = weights[f"{prefix}.mm_projector.{index}.1.weight"], weights[f"{prefix}.mm_projector.{index}.1.bias"]
        x = F.linear(F.gelu(x), w, b)
        index += 1
    return x


def reference_mixer(low, high, weights, depth):
    """SPEC §4 written out: per layer LayerNorm(d_in), token MLP on the transpose, LayerNorm(d_in),
    channel MLP; no residuals; streams concatenated along tokens."""
    outputs = []
    for stream, x in (("low_mixer", low), ("high_mixer", high)):
        for layer in range(depth):
            p = f"{stream}.{layer}"
            d_in = x.shape[-1]
            x = F.layer_norm(x, (d_in,), weights[f"{p}.ln1.weight"], weights[f"{p}.ln1.bias"])
            x = reference_mlp(x.transpose(1, 2), weights, f"{p}.mlp1").transpose(1, 2)
            x = F.layer_norm(x, (d_in,), weights[f"{p}.ln2.weight"], weights[f"{p}.ln2.bias"])
            x = reference_mlp(x, weights, f"{p}.mlp2")
        outputs.append(x)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("depth,mlp_depth", [(2, 2), (3, 3)])
def test_mixer_computes_what_spec_section_4_says(depth, mlp_depth):
    torch.manual_seed(0)
    low_tokens = [12, 10, 8][:depth]
    high_tokens = [6, 7, 8][:depth]
    mixer = MixerProjector((16, 24), low_tokens, (4, 40), high_tokens, output_dim=32, depth=depth, mlp_depth=mlp_depth)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for name, p in mixer.named_parameters():
            if ".ln" in name:
                p.normal_()
    low, high = torch.randn(3, 16, 24), torch.randn(3, 4, 40)
    out = mixer(low, high)
    assert out.shape == (3, low_tokens[-1] + high_tokens[-1], 32)
    torch.testing.assert_close(out, reference_mixer(low, high, mixer.state_dict(), depth))
    # widths double up to output_dim: the first layer of a depth-2 stream outputs H/2
    assert mixer.low_mixer[0].mlp2.mm_projector[0].out_features == 32 // 2 ** (depth - 1)


def test_mixer_contract_shape_with_paper_inputs_and_a_small_width():
    mixer = MixerProjector(output_dim=64)
    out = mixer(torch.randn(2, 256, 384), torch.randn(2, 32, 768))
    assert out.shape == (2, 256, 64)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_every_projector_emits_num_tokens_of_the_llm_width(name):
    options = {"mixer": {"low_output_size": (6, 5), "high_output_size": (3, 4)}}.get(name, {})
    projector = build_projector(name, low_input_size=(8, 16), high_input_size=(2, 32), output_dim=24, **options)
    out = projector(torch.randn(2, 8, 16), torch.randn(2, 2, 32))
    assert out.shape == (2, projector.num_tokens, 24)
    expected_tokens = {"mixer": 9, "mlp": 2, "linear": 2, "low_high_mlp": 10, "mhsa": 32}[name]
    assert projector.num_tokens == expected_tokens


def test_projectors_refuse_tokens_of_the_wrong_shape():
    mixer = MixerProjector((16, 24), (8, 4), (4, 40), (4, 4), output_dim=32)
    with pytest.raises(ValueError, match=r"low stream expects tokens \(B, 16, 24\)"):
        mixer(torch.randn(1, 15, 24), torch.randn(1, 4, 40))
    with pytest.raises(ValueError, match="one token count per mixer layer"):
        MixerProjector((16, 24), (8,), (4, 40), (4, 4), output_dim=32, depth=2)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("resampler", (1, 1), (1, 1), 8)
