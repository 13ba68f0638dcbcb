"""An inference-only DCFormer that computes what the plain eval-mode module computes, faster on CPUs.

``FastDCFormer.from_module(dcformer)`` (or :func:`optimize_for_inference`) returns a module with
the same output contract (five depth-major token tensors ``(B, N_i, C_i)``) and outputs equal to
``dcformer.eval()``'s within float32 rounding (tested at 1e-5 relative). The plain
:class:`~med3dvlm.models.dcformer.DCFormer` stays the training module and the one whose parameter
names checkpoints use; this one holds derived constants only (buffers, no parameters).

What makes it faster (each measured by ``experiments/benchmarks/bench_encoder.py``):

* **BatchNorm folded** into the convolutions (eval statistics are constants): three fewer passes
  over every feature map per decomposed convolution, and the three branch biases become one.
* **Channels-last throughout**: feature maps live as ``(B, D, H, W, C)``, so the channel MLP
  needs no permutes, the 1x1x1 projection is one matmul, max pooling uses the channels-last kernel,
  and the depth-major tokens of every stage are free views.
* **No (k,1,1) conv3d**: oneDNN runs 1-D kernels of conv3d slowly on CPU. The depthwise branches
  run as depthwise conv2d on views of the same memory ((D, H·W) for the depth axis, (H, W) planes for
  the other two); the dense stem branches run as one GEMM per tap on the whole flattened feature
  map shifted by the tap's offset (3k-2 taps of work, where a cross-shaped conv2d computes k^2 + k - 1:
  the stem's three k=3 convolutions ~1.25x faster, the encoder at 32x64x64 ~15 %); the stride-4 stem
  convolution (one input channel) is an im2col of its 19 distinct taps, gathered from the volume
  without a padded copy, and one matmul.
* **Layer scale folded** into the MLP's second Linear, the residual added by the matmul (addmm),
  GELU in place: fewer fresh feature-map-sized allocations, which cost page faults on Linux.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from med3dvlm.models.dcformer import (
    DCConvBlock,
    DCFormer,
    DCFormerStem,
    DecomposedConv3d,
)

# DCFormer works in the released layout (B, C, H, W, D): branch i of a decomposed convolution runs
# along released axis i. This module keeps (B, D, H, W, C); released axis -> our spatial axis.
_RELEASED_AXIS_TO_OURS = {0: 1, 1: 2, 2: 0}  # H -> 1, W -> 2, D -> 0 in (D, H, W)


def fold_batch_norm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the single convolution equal to ``norm(conv(x))`` in eval mode.

    Computed in float64 so the folding itself adds no rounding beyond the final cast.
    """
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded (track_running_stats=False)")
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    shift = -norm.running_mean.detach().double() * scale
    if norm.affine:
        scale = scale * norm.weight.detach().double()
        shift = shift * norm.weight.detach().double() + norm.bias.detach().double()
    folded_weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
    folded_bias = bias * scale + shift
    return folded_weight, folded_bias


def _folded_axis_kernels(conv: DecomposedConv3d) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per spatial axis of (D, H, W): the folded 1-D kernel ``(C_out, C_in/groups, k)``; and the
    summed bias of the three branches (float64)."""
    kernels, bias = {}, 0.0
    for released_axis, branch in enumerate(conv.branches):
        weight, branch_bias = fold_batch_norm(branch.conv, branch.norm)
        kernels[_RELEASED_AXIS_TO_OURS[released_axis]] = weight.reshape(weight.shape[0], weight.shape[1], -1)
        bias = bias + branch_bias
    return kernels, bias


def _has_activation(conv: DecomposedConv3d) -> bool:
    return not isinstance(conv.activation, nn.Identity)


class StridedStemConv(nn.Module):
    """The stride-s decomposed convolution of the stem as im2col + one matmul.

    With one input channel the three branches read only 3k-2 distinct voxels per output voxel (the
    centre tap is shared), so gathering those into a ``(voxels, 3k-2)`` matrix is cheap and the
    convolution becomes one well-shaped GEMM.
    """

    def __init__(self, conv: DecomposedConv3d) -> None:
        super().__init__()
        first = conv.branches[0].conv
        self.kernel_size = first.kernel_size[0]
        self.stride = first.stride[0]
        kernels, bias = _folded_axis_kernels(conv)
        centre = self.kernel_size // 2
        # one (C_out, C_in) weight per im2col column: the shared centre (three axes summed) first
        columns = [sum(kernels[axis][:, :, centre] for axis in range(3))]
        columns += [kernels[axis][:, :, tap] for axis, tap in self.taps()[1:]]
        # -> matrix (C_in * T, C_out), rows ordered (input channel, tap) like the im2col columns
        weight = torch.stack(columns, dim=-1).flatten(1).t()
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", bias.float())
        self.activation = _has_activation(conv)

    def taps(self) -> list[tuple[int, int]]:
        """(axis, kernel index) per im2col column: the centre voxel first, then off-centre taps."""
        centre = self.kernel_size // 2
        return [(0, centre)] + [(axis, t) for axis in range(3) for t in range(self.kernel_size) if t != centre]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W)`` -> ``(B, D', H', W', C_out)``."""
        s, p = self.stride, self.kernel_size // 2
        b, c = x.shape[:2]
        sizes = x.shape[2:]
        out_sizes = [(n - 1) // s + 1 for n in sizes]
        taps = self.taps()
        # im2col straight from x: a tap's window is x[i*s + offset] along its axis, zero outside x
        # (no padded copy of the whole volume: that cost as much as a third of this module)
        col = x.new_zeros(b, *out_sizes, c, len(taps))
        for column, (axis, tap) in enumerate(taps):
            offset = tap - p
            first = -(offset // s) if offset < 0 else 0  # ceil(-offset / s)
            last = min(out_sizes[axis] - 1, (sizes[axis] - 1 - offset) // s)
            if last < first:
                continue
            source: list[slice] = [slice(0, s * (n - 1) + 1, s) for n in out_sizes]
            target: list[slice] = [slice(None)] * 3
            source[axis] = slice(first * s + offset, last * s + offset + 1, s)
            target[axis] = slice(first, last + 1)
            window = x[(slice(None), slice(None), *source)]  # (B, C_in, D', H', W') with the axis clipped
            col[(slice(None), *target, slice(None), column)] = window.permute(0, 2, 3, 4, 1)
        out = torch.addmm(self.bias, col.view(-1, c * len(taps)), self.weight).view(b, *out_sizes, -1)
        if self.activation:
            out = F.gelu(out)
        return out


class DenseAxisConv(nn.Module):
    """A stride-1, groups-1 decomposed convolution on ``(B, D, H, W, C)`` as shifted GEMMs.

    Every tap is one matmul of the whole feature map, flattened to ``(voxels, C)`` rows, shifted by
    the tap's offset in rows: the three centre taps summed into one GEMM, then each off-centre tap
    added in place (``addmm_``). A flat shift also reaches across a border (the next row, plane or
    volume), so the rows that must see zero padding there are saved before the tap and put back
    after it (a thin slab; exact, unlike subtracting). That is ``3k - 2`` taps of work, where a
    cross-shaped ``k x k`` conv2d computes ``k^2 + k - 1`` (9 + 2 = 11 against 7 for the stem's k=3).
    """

    def __init__(self, conv: DecomposedConv3d) -> None:
        super().__init__()
        kernels, bias = _folded_axis_kernels(conv)
        k = kernels[0].shape[-1]
        centre = k // 2
        # (C_in, C_out) per tap: the centre of the three branches summed first, then (axis, offset)
        self.register_buffer("centre_weight", sum(kernels[a][:, :, centre] for a in range(3)).t().float().contiguous())
        self.offsets = [(axis, t - centre) for axis in range(3) for t in range(k) if t != centre]
        weights = torch.stack([kernels[axis][:, :, centre + offset].t() for axis, offset in self.offsets])
        self.register_buffer("tap_weights", weights.float().contiguous())
        self.register_buffer("bias", bias.float())
        self.activation = _has_activation(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        sizes = (d, h, w)
        rows_per_step = (h * w, w, 1)  # flat rows between neighbours along depth, height, width
        source = x.reshape(-1, c)
        total = source.shape[0]
        out = torch.addmm(self.bias, source, self.centre_weight)
        grid = out.view(b, d, h, w, -1)
        for (axis, offset), weight in zip(self.offsets, self.tap_weights):
            if abs(offset) >= sizes[axis]:
                continue  # every neighbour along this axis lies in the padding
            shift = offset * rows_per_step[axis]
            # the voxels whose neighbour at `offset` lies outside the volume: their rows keep their value
            border = [slice(None)] * 5
            border[axis + 1] = slice(sizes[axis] - offset, None) if offset > 0 else slice(0, -offset)
            kept = grid[tuple(border)].clone()
            if shift > 0:
                out[: total - shift].addmm_(source[shift:], weight)
            else:
                out[-shift:].addmm_(source[: total + shift], weight)
            grid[tuple(border)] = kept
        return F.gelu(grid) if self.activation else grid


class DepthwiseAxisConv(nn.Module):
    """A depthwise decomposed convolution on ``(B, D, H, W, C)`` as three depthwise conv2d on views:
    depth over ``(D, H·W)``, height and width over each ``(H, W)`` plane."""

    def __init__(self, conv: DecomposedConv3d) -> None:
        super().__init__()
        kernels, bias = _folded_axis_kernels(conv)
        channels, k = kernels[0].shape[0], kernels[0].shape[-1]
        self.register_buffer("depth_weight", kernels[0].reshape(channels, 1, k, 1).float().contiguous())
        self.register_buffer("height_weight", kernels[1].reshape(channels, 1, k, 1).float().contiguous())
        self.register_buffer("width_weight", kernels[2].reshape(channels, 1, 1, k).float().contiguous())
        self.register_buffer("bias", bias.float())
        self.padding = k // 2
        self.activation = _has_activation(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        p = self.padding
        depth_view = x.reshape(b, d, h * w, c).permute(0, 3, 1, 2)
        out = F.conv2d(depth_view, self.depth_weight, self.bias, padding=(p, 0), groups=c)
        out = out.permute(0, 2, 3, 1).reshape(b * d, h, w, c)
        planes = x.reshape(b * d, h, w, c).permute(0, 3, 1, 2)
        out += F.conv2d(planes, self.height_weight, None, padding=(p, 0), groups=c).permute(0, 2, 3, 1)
        out += F.conv2d(planes, self.width_weight, None, padding=(0, p), groups=c).permute(0, 2, 3, 1)
        out = out.view(b, d, h, w, c)
        if self.activation:
            out = F.gelu(out)
        return out


class FastConvBlock(nn.Module):
    """:class:`DCConvBlock` on ``(B, D, H, W, C)``: pool + projection, depthwise conv, MLP, residual."""

    def __init__(self, block: DCConvBlock) -> None:
        super().__init__()
        self.downsample = block.downsample
        if block.downsample:
            if block.proj.bias is not None:
                raise ValueError("the fast path expects the bias-free 1x1x1 projection of SPEC §2")
            self.register_buffer("proj_weight", block.proj.weight.detach().flatten(1).t().contiguous())
        self.token_mixer = DepthwiseAxisConv(block.token_mixer)
        mlp, scale = block.mlp, block.layer_scale.detach().double()
        self.register_buffer("fc1_weight", mlp.fc1.weight.detach().t().contiguous())
        self.register_buffer("fc1_bias", mlp.fc1.bias.detach().clone())
        # layer scale folded into fc2: (h @ W2^T + b2) * s == h @ (W2 * s)^T + b2 * s
        fc2_weight = mlp.fc2.weight.detach().double() * scale[:, None]
        self.register_buffer("fc2_weight", fc2_weight.t().float().contiguous())
        self.register_buffer("fc2_bias", (mlp.fc2.bias.detach().double() * scale).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            pooled = F.max_pool3d(x.permute(0, 4, 1, 2, 3), kernel_size=3, stride=2, padding=1)
            pooled = pooled.permute(0, 2, 3, 4, 1).contiguous()  # a view for the channels-last kernel
            x = torch.matmul(pooled, self.proj_weight)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        mixed = self.token_mixer(x).reshape(-1, shape[-1])
        hidden = torch.addmm(self.fc1_bias, mixed, self.fc1_weight)
        hidden = torch.ops.aten.gelu_(hidden)
        out = torch.addmm(flat, hidden, self.fc2_weight)  # residual + MLP in one GEMM
        out += self.fc2_bias
        return out.view(shape)


def _fast_decomposed(conv: DecomposedConv3d) -> nn.Module:
    first = conv.branches[0].conv
    if first.groups == 1 and first.stride[0] > 1:
        return StridedStemConv(conv)
    if first.groups == 1:
        return DenseAxisConv(conv)
    if first.groups == first.in_channels == first.out_channels:
        return DepthwiseAxisConv(conv)
    raise ValueError(f"no fast path for a decomposed convolution with groups={first.groups}, stride={first.stride}")


class FastDCFormer(nn.Module):
    """Inference-only DCFormer (see the module docstring); build it with :meth:`from_module`.

    ``forward(x)`` takes ``(B, 1, D, H, W)`` and returns the five stage token tensors, like
    :class:`DCFormer` in eval mode. Gradients are not tracked; the weights are frozen copies.
    """

    def __init__(self, stem: list[nn.Module], stages: list[list[nn.Module]], channels: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.channels = tuple(channels)

    @classmethod
    def from_module(cls, dcformer: DCFormer) -> FastDCFormer:
        """Folds a (trained) DCFormer's eval-mode computation into a FastDCFormer (float32, same device)."""
        if not isinstance(dcformer, DCFormer):
            raise TypeError(f"FastDCFormer.from_module needs a DCFormer, got {type(dcformer).__name__}")
        stem_module = dcformer.stages[0]
        if not isinstance(stem_module, DCFormerStem):
            raise TypeError("DCFormer's first stage is not its stem")
        with torch.no_grad():
            stem = [_fast_decomposed(conv) for conv in stem_module.convs]
            stages = [[FastConvBlock(block) for block in stage] for stage in dcformer.stages[1:]]
        fast = cls(stem, stages, dcformer.channels)
        device = next(dcformer.parameters()).device
        return fast.to(device=device, dtype=torch.float32).eval()

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return self.channels

    @staticmethod
    def stage_grids(input_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        return DCFormer.stage_grids(input_shape)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"FastDCFormer expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        x = x.to(torch.float32)
        features = self.stem[0](x)
        for conv in self.stem[1:]:
            features = conv(features)
        outputs = [features.reshape(x.shape[0], -1, features.shape[-1])]  # depth-major tokens: a view
        for stage in self.stages:
            features = stage(features)
            outputs.append(features.reshape(x.shape[0], -1, features.shape[-1]))
        return outputs


def optimize_for_inference(encoder: nn.Module) -> nn.Module:
    """The fastest equivalent of ``encoder.eval()`` this package has: a :class:`FastDCFormer` for a
    DCFormer; any other encoder (e.g. ViT3D) comes back as an eval-mode copy, unchanged."""
    if isinstance(encoder, DCFormer):
        return FastDCFormer.from_module(encoder)
    return copy.deepcopy(encoder).eval()
