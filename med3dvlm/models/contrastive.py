"""The stage-1 model: image and text towers with linear heads into one shared space (SPEC §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# SPEC §3: both embeddings are projected to a shared width of 768.
SHARED_EMBEDDING_DIM = 768


class ContrastiveModel(nn.Module):
    """Image: mean of the last stage's tokens -> Linear -> L2 norm. Text: CLS -> Linear -> L2 norm."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = SHARED_EMBEDDING_DIM):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_projection = nn.Linear(image_encoder.stage_channels[-1], embed_dim)
        self.text_projection = nn.Linear(text_encoder.hidden_size, embed_dim)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.image_encoder(image)[-1]
        return F.normalize(self.image_projection(tokens.mean(dim=1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask)), dim=-1)
