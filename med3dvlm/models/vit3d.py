"""A plain 3D ViT, the comparison encoder of the released code (SPEC §2, ``vit3d``).

Kept as a selectable baseline with DCFormer's output contract: ``ViT3D(...)(x)`` with ``x`` of shape
``(B, 1, D, H, W)`` returns a one-element list ``[(B, N, width)]``, CLS dropped, tokens depth-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# SPEC §2: cubic 32-voxel patches, 8 heads of 64, width 768, depth 12. The released code passes 4
# as the MLP hidden width, surely meant as a ratio; we use the ratio.
VIT3D_PATCH_SIZE = 32
VIT3D_HEADS = 8
VIT3D_HEAD_DIM = 64
VIT3D_WIDTH = 768
VIT3D_DEPTH = 12
VIT3D_MLP_RATIO = 4


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP, both residual."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.attention = Attention(width, heads, head_dim, dropout)
        self.feed_forward = FeedForward(width, mlp_ratio * width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class ViT3D(nn.Module):
    """Plain 3D ViT on cubic patches with a CLS token and learned position embeddings."""

    def __init__(
        self,
        image_size: tuple[int, int, int] = (128, 256, 256),
        in_channels: int = 1,
        patch_size: int = VIT3D_PATCH_SIZE,
        width: int = VIT3D_WIDTH,
        depth: int = VIT3D_DEPTH,
        heads: int = VIT3D_HEADS,
        head_dim: int = VIT3D_HEAD_DIM,
        mlp_ratio: int = VIT3D_MLP_RATIO,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if any(n % patch_size for n in image_size):
            raise ValueError(f"image_size {tuple(image_size)} must be divisible by patch_size {patch_size}")
        self.image_size = tuple(image_size)
        self.patch_size = patch_size
        self.grid = tuple(n // patch_size for n in image_size)  # (D, H, W) patches
        patch_dim = in_channels * patch_size**3
        self.patch_embedding = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, width), nn.LayerNorm(width))
        num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, width) * 0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(width, heads, head_dim, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.stage_channels = (width,)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> depth-major patches ``(B, N, p³·C)``; voxels inside a patch in the
        released (H, W, D, C) order."""
        b, c, d, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
        # -> (B, Dp, Hp, Wp, p_h, p_w, p_d, C)
        x = x.permute(0, 2, 4, 6, 5, 7, 3, 1)
        return x.reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"ViT3D was built for volumes {self.image_size}, got {tuple(x.shape[2:])}")
        tokens = self.patch_embedding(self.patchify(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding
        tokens = self.norm(self.blocks(tokens))
        return [tokens[:, 1:]]
