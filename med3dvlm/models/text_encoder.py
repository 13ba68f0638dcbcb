"""A Hugging Face text encoder pooled to one vector per report (SPEC §3: first-token state)."""

from __future__ import annotations

import os

import torch
from torch import nn


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=_is_local(name_or_path))


def _is_local(name_or_path: str) -> bool:
    return os.path.isdir(name_or_path) or os.environ.get("HF_HUB_OFFLINE") == "1"


POOLINGS = ("cls", "mean")


class TextEncoder(nn.Module):
    """``AutoModel`` + pooling to one vector; ``hidden_size`` covers BERT and DistilBERT configs.

    ``pooling="cls"`` (default) is SPEC §3's first-token state; ``"mean"`` averages the unpadded
    tokens, which is how sentence-embedding models such as all-MiniLM-L6-v2 were trained.

    ``freeze_layers`` keeps the embeddings and the lowest N transformer layers fixed, and
    ``trainable=False`` freezes everything (a locked text tower, as in LiT): it then always runs in
    eval mode, so an embedding is a pure function of the tokens, and ``cache_embeddings=True``
    remembers each one. After the first epoch the text tower costs nothing, which is what makes
    training on a CPU affordable.
    """

    def __init__(
        self,
        name_or_path: str,
        trainable: bool = True,
        freeze_layers: int = 0,
        gradient_checkpointing: bool = False,
        pooling: str = "cls",
        cache_embeddings: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.name_or_path = name_or_path
        self.model = AutoModel.from_pretrained(name_or_path, local_files_only=_is_local(name_or_path))
        self.trainable = trainable
        if cache_embeddings and trainable:
            raise ValueError("cache_embeddings needs trainable=False: a trained tower's embeddings change")
        self._cache: dict[bytes, torch.Tensor] | None = {} if cache_embeddings else None
        self.model.train(trainable)  # from_pretrained returns eval mode; fine-tuning wants dropout on
        config = self.model.config
        self.hidden_size = getattr(config, "hidden_size", None) or config.dim  # DistilBERT names it `dim`
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if not trainable:
            self.model.requires_grad_(False)
        elif freeze_layers:
            self._freeze_lower_layers(freeze_layers)

    def _freeze_lower_layers(self, count: int) -> None:
        embeddings = getattr(self.model, "embeddings", None)
        if embeddings is not None:
            embeddings.requires_grad_(False)
        layers = _transformer_layers(self.model)
        if count > len(layers):
            raise ValueError(f"freeze_layers={count} but the text encoder has {len(layers)} layers")
        for layer in layers[:count]:
            layer.requires_grad_(False)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a locked tower never runs dropout
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            return self._encode(input_ids, attention_mask)
        keys = [ids[mask.bool()].cpu().numpy().tobytes() for ids, mask in zip(input_ids, attention_mask)]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            with torch.no_grad():
                fresh = self._encode(input_ids[missing], attention_mask[missing])
            for i, vector in zip(missing, fresh):
                self._cache[keys[i]] = vector.detach()
        return torch.stack([self._cache[key] for key in keys]).to(input_ids.device)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers"):  # BERT, DistilBERT, others
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__} to freeze")
