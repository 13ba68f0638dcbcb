"""DCFormer: a 3D encoder built from decomposed convolutions (SPEC §2; arXiv 2502.05091).

A k×k×k convolution costs k³ multiply-adds per voxel and channel; DCFormer replaces it by three
1-D convolutions along the three axes (3k), which is what makes 128×256×256 CT volumes affordable.

The network works in the released code's layout ``(B, C, H, W, D)``: the input ``(B, 1, D, H, W)``
is permuted on entry, and every stage's feature map is returned as depth-major tokens
``(B, D_i·H_i·W_i, C_i)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DCFormerVariant:
    """Blocks per stage s0..s4 and channels C0..C4 (SPEC §2, table of variants)."""

    blocks: tuple[int, int, int, int, int]
    channels: tuple[int, int, int, int, int]


# SPEC §2, "Variants": blocks per stage and channels of the released code.
DCFORMER_VARIANTS: dict[str, DCFormerVariant] = {
    "nano": DCFormerVariant((1, 1, 1, 1, 1), (32, 32, 64, 128, 256)),
    "naive": DCFormerVariant((1, 2, 2, 2, 2), (32, 64, 128, 256, 512)),
    "tiny": DCFormerVariant((1, 2, 3, 3, 2), (64, 96, 192, 384, 768)),
    "small": DCFormerVariant((1, 2, 3, 6, 2), (64, 96, 192, 384, 768)),
    "base": DCFormerVariant((1, 2, 6, 6, 2), (64, 128, 256, 512, 1024)),
    "large": DCFormerVariant((1, 2, 6, 12, 2), (64, 256, 512, 1024, 2048)),
}

# SPEC §2: the stem is one stride-4 decomposed conv with k=7, then three k=3 convs.
STEM_KERNEL_SIZE = 7
STEM_STRIDE = 4
STEM_REFINE_KERNEL_SIZE = 3
STEM_REFINE_CONVS = 3
# SPEC §2: kernel sizes of the depthwise decomposed convolutions in s1..s4.
STAGE_KERNEL_SIZES = (13, 11, 9, 7)
# SPEC §2: channel MLP expansion C -> 4C -> C, layer scale initialised to 1e-6.
MLP_RATIO = 4
LAYER_SCALE_INIT = 1e-6


class AxisConvNorm(nn.Module):
    """One branch of a decomposed convolution: a 1-D convolution along one axis + BatchNorm."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, axis: int, stride: int, groups: int
    ) -> None:
        super().__init__()
        kernel = [1, 1, 1]
        padding = [0, 0, 0]
        kernel[axis] = kernel_size
        padding[axis] = kernel_size // 2
        self.conv = nn.Conv3d(
            in_channels, out_channels, tuple(kernel), stride=stride, padding=tuple(padding), groups=groups
        )
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.in_channels == 1 and _bf16_on_cpu(x):
            return self.norm(self._conv_fp32(x))
        return self.norm(self.conv(x))

    def _conv_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution in fp32, its result in ``x``'s dtype (fp32 under autocast, whose input volume
        is fp32). Torch 2.13's CPU (oneDNN) bf16 conv3d with one input channel, stride 4 and a
        ``(1, 1, 7)`` kernel, DCFormer's first convolution, corrupts the heap (a crash within tens of
        calls: ``F.conv3d(x, w, stride=4, padding=(0, 0, 3))``, ``x`` (2, 1, 32, 32, 16) and ``w``
        (32, 1, 1, 1, 7) in bf16, contiguous or not). This convolution is one of the cheapest in the
        network (one input channel), so fp32 costs nothing measurable."""
        conv = self.conv
        bias = conv.bias.float() if conv.bias is not None else None
        with torch.autocast("cpu", enabled=False):
            y = F.conv3d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return y.to(x.dtype)


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through a bf16 CPU convolution: a bf16 tensor, or bf16 autocast on the CPU."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class DecomposedConv3d(nn.Module):
    """Sum of three axis-aligned 1-D convolutions, each with its own BatchNorm (SPEC §2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            AxisConvNorm(in_channels, out_channels, kernel_size, axis, stride, groups) for axis in range(3)
        )
        self.activation = nn.GELU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x) + self.branches[1](x) + self.branches[2](x)
        return self.activation(out)


class ChannelMLP(nn.Module):
    """Per-voxel MLP on channels-last features: Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, channels: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, channels)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DCFormerStem(nn.Module):
    """Stage s0: a stride-4 decomposed conv then three refining ones.

    The released code put the intended GELU into the norm slot, so its stem runs BatchNorm and no
    activation; ``activation=False`` (default) reproduces that, which released weights need.
    """

    def __init__(self, in_channels: int, channels: int, activation: bool = False) -> None:
        super().__init__()
        convs = [DecomposedConv3d(in_channels, channels, STEM_KERNEL_SIZE, STEM_STRIDE, activation=activation)]
        convs += [
            DecomposedConv3d(channels, channels, STEM_REFINE_KERNEL_SIZE, 1, activation=activation)
            for _ in range(STEM_REFINE_CONVS)
        ]
        self.convs = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class DCConvBlock(nn.Module):
    """Depthwise decomposed conv + channel MLP with layer scale, residual (SPEC §2, s1..s4).

    A downsampling block first max-pools by 2 and projects channels with a 1×1×1 conv; the
    residual then starts from that projected tensor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        downsample: bool,
        dropout: float = 0.0,
        layer_scale_init: float = LAYER_SCALE_INIT,
    ) -> None:
        super().__init__()
        if downsample:
            self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
            self.proj = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
        elif in_channels != out_channels:
            raise ValueError("a block without downsampling keeps its channel count")
        self.downsample = downsample
        self.token_mixer = DecomposedConv3d(out_channels, out_channels, kernel_size, groups=out_channels)
        self.mlp = ChannelMLP(out_channels, MLP_RATIO * out_channels, dropout)
        self.layer_scale = nn.Parameter(torch.full((out_channels,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.token_mixer(x).permute(0, 2, 3, 4, 1)  # channels-last for the MLP
        y = self.mlp(y) * self.layer_scale
        return x + y.permute(0, 4, 1, 2, 3)


def feature_map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W, D)`` -> depth-major tokens ``(B, D·H·W, C)``."""
    b, c = x.shape[:2]
    return x.permute(0, 4, 2, 3, 1).reshape(b, -1, c)


class DCFormer(nn.Module):
    """DCFormer encoder returning the tokens of all five stages.

    ``DCFormer("small")(x)`` with ``x`` of shape ``(B, 1, D, H, W)`` returns a list of five tensors
    ``(B, N_i, C_i)``; for 128×256×256, s3 is (256, 384) and s4 is (32, 768).
    """

    def __init__(
        self,
        variant: str = "small",
        in_channels: int = 1,
        stem_activation: bool = False,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        blocks: tuple[int, ...] | None = None,
        channels: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if variant not in DCFORMER_VARIANTS and (blocks is None or channels is None):
            known = ", ".join(DCFORMER_VARIANTS)
            raise ValueError(f"unknown DCFormer variant {variant!r}; choose one of {known} or give blocks+channels")
        spec = DCFORMER_VARIANTS.get(variant)
        blocks = tuple(blocks if blocks is not None else spec.blocks)
        channels = tuple(channels if channels is not None else spec.channels)
        if len(blocks) != 5 or len(channels) != 5 or blocks[0] != 1:
            raise ValueError("DCFormer needs five stages (blocks, channels) with a single stem block")
        self.variant = variant
        self.blocks = blocks
        self.channels = channels
        self.gradient_checkpointing = gradient_checkpointing

        stages: list[nn.Module] = [DCFormerStem(in_channels, channels[0], activation=stem_activation)]
        for i, kernel in enumerate(STAGE_KERNEL_SIZES, start=1):
            stage = [
                DCConvBlock(channels[i - 1] if j == 0 else channels[i], channels[i], kernel, j == 0, dropout)
                for j in range(blocks[i])
            ]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.apply(_init_weights)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return self.channels

    @staticmethod
    def stage_grids(input_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """``(D, H, W)`` of every stage's feature map for an input ``(D, H, W)``."""
        grid = [(n - 1) // STEM_STRIDE + 1 for n in input_shape]
        grids = [tuple(grid)]
        for _ in STAGE_KERNEL_SIZES:
            grid = [(n - 1) // 2 + 1 for n in grid]
            grids.append(tuple(grid))
        return grids

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"DCFormer expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        x = x.permute(0, 1, 3, 4, 2)  # (B, C, D, H, W) -> released layout (B, C, H, W, D)
        outputs = []
        for stage in self.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            outputs.append(feature_map_to_tokens(x))
        return outputs


def _init_weights(module: nn.Module) -> None:
    """Variance-preserving convolutions (std 1/sqrt(fan_in)), so features keep their scale through
    the five stages; small truncated-normal MLP weights, as in ConvNeXt-style blocks."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    if isinstance(module, (nn.Conv3d, nn.Linear)) and module.bias is not None:
        nn.init.zeros_(module.bias)
