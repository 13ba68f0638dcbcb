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


class TextEncoder(nn.Module):
    """``AutoModel`` + first-token (CLS) pooling; ``hidden_size`` covers BERT and DistilBERT configs.

    ``freeze_layers`` keeps the embeddings and the lowest N transformer layers fixed, and
    ``trainable=False`` freezes everything: on a CPU this is what makes a pretrained text tower cheap.
    """

    def __init__(
        self,
        name_or_path: str,
        trainable: bool = True,
        freeze_layers: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        self.name_or_path = name_or_path
        self.model = AutoModel.from_pretrained(name_or_path, local_files_only=_is_local(name_or_path))
        self.model.train()  # from_pretrained returns eval mode; fine-tuning wants dropout on
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, 0]


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
