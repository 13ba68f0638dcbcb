"""The stage-1 model: image and text towers with linear heads into one shared space (SPEC §3)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


# -- export: one self-contained folder per stage-1 model -------------------------------------------
CONTRASTIVE_CONFIG_FILE = "med3dvlm_clip.json"
CONTRASTIVE_WEIGHTS_FILE = "model.safetensors"  # image tower + both heads
TEXT_ENCODER_DIR = "text_encoder"  # the HF text model and its tokenizer, in transformers' own format
CONTRASTIVE_FORMAT = "med3dvlm-clip"
CONTRASTIVE_FORMAT_VERSION = 1


def save_pretrained_contrastive(
    model: ContrastiveModel,
    output_dir: str | os.PathLike,
    tokenizer: Any,
    image_size: Sequence[int] | None = None,
    max_text_tokens: int = 512,
) -> Path:
    """Writes ``model`` so that :func:`load_pretrained_contrastive` rebuilds it with no other file:
    ``med3dvlm_clip.json`` (architecture, the volume size it was trained at, text settings),
    ``model.safetensors`` (image tower and heads) and ``text_encoder/`` (HF model + tokenizer)."""
    from med3dvlm.models.folders import write_record, write_weights

    encoder_config = getattr(model.image_encoder, "build_config", None)
    if encoder_config is None:
        raise ValueError("the image encoder was not made by build_encoder, so its architecture cannot be recorded")
    text_model = getattr(model.text_encoder, "model", None)
    if text_model is None or not hasattr(text_model, "save_pretrained"):
        raise ValueError("the text encoder holds no Hugging Face model (`.model`) to save")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text_model.save_pretrained(output_dir / TEXT_ENCODER_DIR)
    tokenizer.save_pretrained(output_dir / TEXT_ENCODER_DIR)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    write_weights(output_dir / CONTRASTIVE_WEIGHTS_FILE, weights)
    config = {
        "format": CONTRASTIVE_FORMAT,
        "format_version": CONTRASTIVE_FORMAT_VERSION,
        "image_size": None if image_size is None else [int(n) for n in image_size],
        "embed_dim": int(model.image_projection.out_features),
        "image_encoder": {k: v for k, v in encoder_config.items() if k != "pretrained"},
        "text_encoder": {"pooling": getattr(model.text_encoder, "pooling", "cls"), "max_length": int(max_text_tokens)},
    }
    write_record(output_dir / CONTRASTIVE_CONFIG_FILE, config)
    return output_dir


def load_pretrained_contrastive(path: str | os.PathLike) -> tuple[ContrastiveModel, Any, dict[str, Any]]:
    """``(model, tokenizer, config)`` from a folder written by :func:`save_pretrained_contrastive`;
    the model is in eval mode with both towers frozen."""
    from safetensors.torch import load_file

    from med3dvlm.models.encoders import build_encoder
    from med3dvlm.models.text_encoder import TextEncoder, load_tokenizer

    path = Path(path)
    config_file = path / CONTRASTIVE_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {path} is not a stage-1 folder written by med3dvlm.export")
    config = json.loads(config_file.read_text())
    if config.get("format") != CONTRASTIVE_FORMAT or config.get("format_version") != CONTRASTIVE_FORMAT_VERSION:
        raise ValueError(f"{config_file}: unsupported format {config.get('format')!r} v{config.get('format_version')}")
    encoder_config = dict(config["image_encoder"])
    image_encoder = build_encoder(encoder_config.pop("name"), **encoder_config)
    text_dir = str(path / TEXT_ENCODER_DIR)
    text_encoder = TextEncoder(text_dir, trainable=False, pooling=config["text_encoder"]["pooling"])
    model = ContrastiveModel(image_encoder, text_encoder, embed_dim=config["embed_dim"])
    missing, unexpected = model.load_state_dict(load_file(str(path / CONTRASTIVE_WEIGHTS_FILE)), strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]  # those came from text_encoder/
    if missing or unexpected:
        weights = path / CONTRASTIVE_WEIGHTS_FILE
        raise ValueError(f"{weights}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    return model.eval(), load_tokenizer(text_dir), config
