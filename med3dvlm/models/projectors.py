"""Projectors: image-encoder tokens -> LLM-width image tokens (SPEC §4).

Every projector is called as ``projector(low, high)`` with the tokens of the encoder's last two
stages (``vision_select_layer = -2``: low = s3, high = s4), each ``(B, N, C)``, and returns
``(B, num_tokens, output_dim)``; ``num_tokens`` tells the VLM how many ``<im_patch>`` placeholders
one volume needs. Single-stream projectors read ``high`` (the last stage) only.

The Mixer keeps the released module structure (``low_mixer.0.mlp1.mm_projector.1.1.weight``, ...;
see ``reference/official_state_dicts.json``) so released checkpoints load by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# SPEC §4: the paper's Mixer with the small DCFormer at 128x256x256 and Qwen2.5-7B (H = 3584).
PAPER_LOW_INPUT_SIZE = (256, 384)  # s3 tokens x channels
PAPER_HIGH_INPUT_SIZE = (32, 768)  # s4 tokens x channels
PAPER_LOW_OUTPUT_TOKENS = (192, 128)  # token count after each low-stream mixer layer
PAPER_HIGH_OUTPUT_TOKENS = (64, 128)  # token count after each high-stream mixer layer
PAPER_MIXER_DEPTH = 2
PAPER_MLP_DEPTH = 2  # Linear, then GELU + Linear
# SPEC §4: self-attention pooling projector ("mhsa") pools to 32 tokens.
ATTENTION_POOL_TOKENS = 32


class MLP(nn.Module):
    """``Linear(in, out)`` then ``depth - 1`` times ``GELU, Linear(out, out)``.

    The sequence is stored as ``mm_projector`` with each GELU+Linear pair in its own
    ``nn.Sequential``, the released code's layout (``mm_projector.0`` and ``mm_projector.1.1``).
    """

    def __init__(self, in_features: int, out_features: int, depth: int = PAPER_MLP_DEPTH) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"an MLP needs at least one Linear layer, got depth={depth}")
        layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
        layers += [nn.Sequential(nn.GELU(), nn.Linear(out_features, out_features)) for _ in range(depth - 1)]
        self.mm_projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(x)


class MixerLayer(nn.Module):
    """One mixer layer ``(n_in, d_in) -> (n_out, d_out)`` without residuals (SPEC §4).

    LayerNorm over channels, token MLP across the ``n_in`` tokens (on the transposed tensor),
    LayerNorm over channels again, channel MLP ``d_in -> d_out``. Without residuals the token and
    channel counts may change, which is how the Mixer resamples the encoder grid to LLM tokens.
    """

    def __init__(
        self, input_size: tuple[int, int], output_size: tuple[int, int], mlp_depth: int = PAPER_MLP_DEPTH
    ) -> None:
        super().__init__()
        (n_in, d_in), (n_out, d_out) = input_size, output_size
        self.ln1 = nn.LayerNorm(d_in)
        self.mlp1 = MLP(n_in, n_out, mlp_depth)  # token mixing
        self.ln2 = nn.LayerNorm(d_in)
        self.mlp2 = MLP(d_in, d_out, mlp_depth)  # channel mixing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.mlp2(self.ln2(x))


def mixer_stream(
    input_size: tuple[int, int], output_tokens: Sequence[int], output_dim: int, mlp_depth: int
) -> nn.ModuleList:
    """Mixer layers whose token counts follow ``output_tokens`` and whose widths double up to ``output_dim``.

    For the paper's depth 2 the widths are ``H/2, H`` (SPEC §4).
    """
    depth = len(output_tokens)
    widths = [output_dim // 2 ** (depth - 1 - i) for i in range(depth)]
    if widths[0] < 1 or any(w * 2 ** (depth - 1 - i) != output_dim for i, w in enumerate(widths)):
        raise ValueError(f"output_dim={output_dim} must be divisible by 2**(depth-1)={2 ** (depth - 1)}")
    sizes = [tuple(input_size)] + list(zip(output_tokens, widths))
    return nn.ModuleList(MixerLayer(sizes[i], sizes[i + 1], mlp_depth) for i in range(depth))


class MixerProjector(nn.Module):
    """The paper's dual-stream MLP-Mixer (SPEC §4): low (s3) and high (s4) streams, concatenated.

    ``low_output_size`` / ``high_output_size`` give the token count after each of the ``depth``
    mixer layers; channel widths go ``output_dim / 2^(depth-1) ... output_dim``. With the defaults
    (the paper's sizes) and ``output_dim = 3584`` it has 47,221,248 parameters and returns 256 tokens.
    """

    def __init__(
        self,
        low_input_size: Sequence[int] = PAPER_LOW_INPUT_SIZE,
        low_output_size: Sequence[int] = PAPER_LOW_OUTPUT_TOKENS,
        high_input_size: Sequence[int] = PAPER_HIGH_INPUT_SIZE,
        high_output_size: Sequence[int] = PAPER_HIGH_OUTPUT_TOKENS,
        output_dim: int = 3584,
        depth: int = PAPER_MIXER_DEPTH,
        mlp_depth: int = PAPER_MLP_DEPTH,
    ) -> None:
        super().__init__()
        for name, sizes in (("low_output_size", low_output_size), ("high_output_size", high_output_size)):
            if len(sizes) != depth:
                raise ValueError(f"{name}={tuple(sizes)} must list one token count per mixer layer (depth={depth})")
        self.low_input_size = tuple(low_input_size)
        self.high_input_size = tuple(high_input_size)
        self.output_dim = output_dim
        self.low_mixer = mixer_stream(self.low_input_size, low_output_size, output_dim, mlp_depth)
        self.high_mixer = mixer_stream(self.high_input_size, high_output_size, output_dim, mlp_depth)
        self.num_tokens = low_output_size[-1] + high_output_size[-1]

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        _check_tokens("low", low, self.low_input_size)
        _check_tokens("high", high, self.high_input_size)
        for layer in self.low_mixer:
            low = layer(low)
        for layer in self.high_mixer:
            high = layer(high)
        return torch.cat([low, high], dim=1)


class LinearProjector(nn.Module):
    """``linear``: one Linear on the last stage's tokens."""

    def __init__(self, high_input_size: Sequence[int], output_dim: int, **_: object) -> None:
        super().__init__()
        self.high_input_size = tuple(high_input_size)
        self.output_dim = output_dim
        self.num_tokens = self.high_input_size[0]
        self.proj = nn.Linear(self.high_input_size[1], output_dim)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        _check_tokens("high", high, self.high_input_size)
        return self.proj(high)


class MLPProjector(nn.Module):
    """``mlp``: Linear, then ``mlp_depth - 1`` x (GELU, Linear), on the last stage's tokens."""

    def __init__(
        self, high_input_size: Sequence[int], output_dim: int, mlp_depth: int = PAPER_MLP_DEPTH, **_: object
    ) -> None:
        super().__init__()
        self.high_input_size = tuple(high_input_size)
        self.output_dim = output_dim
        self.num_tokens = self.high_input_size[0]
        self.mlp = MLP(self.high_input_size[1], output_dim, mlp_depth)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        _check_tokens("high", high, self.high_input_size)
        return self.mlp(high)


class LowHighMLPProjector(nn.Module):
    """``low_high_mlp``: each stream Linear to ``output_dim``, concatenated along tokens, then GELU+Linear."""

    def __init__(
        self,
        low_input_size: Sequence[int],
        high_input_size: Sequence[int],
        output_dim: int,
        mlp_depth: int = PAPER_MLP_DEPTH,
        **_: object,
    ) -> None:
        super().__init__()
        self.low_input_size = tuple(low_input_size)
        self.high_input_size = tuple(high_input_size)
        self.output_dim = output_dim
        self.num_tokens = self.low_input_size[0] + self.high_input_size[0]
        self.low_proj = nn.Linear(self.low_input_size[1], output_dim)
        self.high_proj = nn.Linear(self.high_input_size[1], output_dim)
        self.mlp = nn.Sequential(
            *[nn.Sequential(nn.GELU(), nn.Linear(output_dim, output_dim)) for _ in range(max(mlp_depth - 1, 1))]
        )

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        _check_tokens("low", low, self.low_input_size)
        _check_tokens("high", high, self.high_input_size)
        return self.mlp(torch.cat([self.low_proj(low), self.high_proj(high)], dim=1))


class AttentionPoolProjector(nn.Module):
    """``mhsa``: a self-attention layer over the last stage's tokens, average-pooled to 32 tokens, then an MLP.

    Pooling keeps the token order (depth-major), so neighbouring tokens are merged.
    """

    def __init__(
        self,
        high_input_size: Sequence[int],
        output_dim: int,
        num_tokens: int = ATTENTION_POOL_TOKENS,
        num_heads: int = 8,
        mlp_depth: int = PAPER_MLP_DEPTH,
        **_: object,
    ) -> None:
        super().__init__()
        self.high_input_size = tuple(high_input_size)
        channels = self.high_input_size[1]
        self.output_dim = output_dim
        self.num_tokens = num_tokens
        heads = num_heads if channels % num_heads == 0 else 1
        self.attention = nn.TransformerEncoderLayer(
            channels, heads, dim_feedforward=4 * channels, activation="gelu", batch_first=True, norm_first=True
        )
        self.pool = nn.AdaptiveAvgPool1d(num_tokens)
        self.mlp = MLP(channels, output_dim, mlp_depth)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        _check_tokens("high", high, self.high_input_size)
        x = self.attention(high)
        x = self.pool(x.transpose(1, 2)).transpose(1, 2)
        return self.mlp(x)


PROJECTORS: dict[str, type[nn.Module]] = {
    "mixer": MixerProjector,
    "mlp": MLPProjector,
    "low_high_mlp": LowHighMLPProjector,
    "linear": LinearProjector,
    "mhsa": AttentionPoolProjector,
}


def build_projector(
    name: str,
    low_input_size: Sequence[int],
    high_input_size: Sequence[int],
    output_dim: int,
    **kwargs: object,
) -> nn.Module:
    """A projector by its config name; the input sizes come from the encoder's actual stage grids."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; choose one of {', '.join(PROJECTORS)}")
    return PROJECTORS[name](
        low_input_size=tuple(low_input_size), high_input_size=tuple(high_input_size), output_dim=output_dim, **kwargs
    )


def _check_tokens(stream: str, x: torch.Tensor, expected: tuple[int, int]) -> None:
    if x.ndim != 3 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"the projector's {stream} stream expects tokens (B, {expected[0]}, {expected[1]}), got {tuple(x.shape)}; "
            "its input sizes must come from the encoder's stage grids at this volume shape"
        )
