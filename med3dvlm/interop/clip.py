"""The released stage-1 model (DCFormer_SigLIP) <-> :class:`ContrastiveModel` + :class:`SigLipLoss`.

Released names (SPEC §8) and their med3dvlm names, the latter as in a stage-1 training
checkpoint (:class:`med3dvlm.stages.contrastive.ContrastiveModule`: ``model.*`` and ``loss.*``):

=========================  ==============================================================
released                   med3dvlm
=========================  ==============================================================
vision_encoder.encoder.*   model.image_encoder.stages.*  (DCFormer rules, interop.dcformer)
language_encoder.*         model.text_encoder.model.*    (the Hugging Face model, unchanged)
mm_vision_proj.*           model.image_projection.*
mm_language_proj.*         model.text_projection.*
t_prime                    loss.logit_scale              (t', logits scaled by exp(t'))
bias                       loss.logit_bias               (b)
=========================  ==============================================================

The released folder's ``config.json`` is read as follows (the released ``dec_clip`` config):
``vision_encoder`` must be ``"dcformer"`` (the variant is read from the weights), ``loss_type``
must be ``"sigmoid"`` when present, ``hidden_size`` is the shared embedding width (default: the
heads' shape). The text model's architecture comes from, in this order: the ``text_config``
argument, a ``text_config`` dict in ``config.json`` (a Hugging Face config with ``model_type``;
med3dvlm's own addition, for offline use), or ``language_model_name_or_path`` (a hub name or a
local folder, e.g. ``medicalai/ClinicalBERT``; only its config is read, the weights come from the
checkpoint). The tokenizer is the folder's own when it holds one, else that name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from med3dvlm.interop.checkpoints import read_config, read_weights, weight_files
from med3dvlm.interop.dcformer import dcformer_from_released, dcformer_to_released, load_released_dcformer
from med3dvlm.interop.naming import (
    ReleasedCheckpointError,
    add_prefix,
    as_scalar,
    load_strict,
    split_prefixes,
)
from med3dvlm.models.contrastive import ContrastiveModel
from med3dvlm.models.losses import SigLipLoss

# Released top-level names (SPEC §8).
RELEASED_VISION = "vision_encoder."
RELEASED_LANGUAGE = "language_encoder."
RELEASED_VISION_HEAD = "mm_vision_proj."
RELEASED_LANGUAGE_HEAD = "mm_language_proj."
RELEASED_SCALE = "t_prime"
RELEASED_BIAS = "bias"
RELEASED_PREFIXES = (
    RELEASED_VISION,
    RELEASED_LANGUAGE,
    RELEASED_VISION_HEAD,
    RELEASED_LANGUAGE_HEAD,
    RELEASED_SCALE,
    RELEASED_BIAS,
)
# med3dvlm names, as in a stage-1 training checkpoint.
OURS_IMAGE_ENCODER = "model.image_encoder."
OURS_TEXT_MODEL = "model.text_encoder.model."
OURS_IMAGE_HEAD = "model.image_projection."
OURS_TEXT_HEAD = "model.text_projection."
OURS_SCALE = "loss.logit_scale"
OURS_BIAS = "loss.logit_bias"
# Older transformers saved BERT's position-id buffer (an arange, nothing learned); newer ones do not.
STALE_TEXT_BUFFERS = ("embeddings.position_ids",)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")


class ReleasedContrastive(NamedTuple):
    """What :func:`load_released_clip` returns: the two towers with heads, the loss with t' and b,
    and where the tokenizer is (None when neither the folder nor its config names one)."""

    model: ContrastiveModel
    loss: SigLipLoss
    tokenizer_path: str | None


class ReleasedTextEncoder(nn.Module):
    """The released language encoder: a Hugging Face model built from its config (the checkpoint
    carries the weights, nothing is downloaded), pooled to the first token's state (SPEC §3).

    It has the interface :class:`ContrastiveModel` needs (``hidden_size``, ``forward(input_ids,
    attention_mask)``) and keeps the model as ``.model``, as med3dvlm's ``TextEncoder`` does, so
    its parameters have the same names as a trained med3dvlm text tower.
    """

    def __init__(self, text_config: Any, name_or_path: str | None = None) -> None:
        super().__init__()
        from transformers import AutoModel

        self.name_or_path = name_or_path or getattr(text_config, "_name_or_path", "") or ""
        self.model = AutoModel.from_config(text_config)
        self.hidden_size = getattr(text_config, "hidden_size", None) or text_config.dim  # DistilBERT: `dim`

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


def clip_from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released DCFormer_SigLIP names -> stage-1 checkpoint names (``model.*``, ``loss.*``)."""
    groups = split_prefixes(state_dict, RELEASED_PREFIXES, "DCFormer_SigLIP checkpoint")
    language = {k: v for k, v in groups[RELEASED_LANGUAGE].items() if k not in STALE_TEXT_BUFFERS}
    ours = {
        **add_prefix(dcformer_from_released(groups[RELEASED_VISION]), OURS_IMAGE_ENCODER),
        **add_prefix(language, OURS_TEXT_MODEL),
        **add_prefix(groups[RELEASED_VISION_HEAD], OURS_IMAGE_HEAD),
        **add_prefix(groups[RELEASED_LANGUAGE_HEAD], OURS_TEXT_HEAD),
    }
    for released, name in ((RELEASED_SCALE, OURS_SCALE), (RELEASED_BIAS, OURS_BIAS)):
        if "" in groups[released]:
            ours[name] = as_scalar(groups[released][""], released)
    return ours


def clip_to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage-1 checkpoint names (``model.*``, ``loss.*``) -> released DCFormer_SigLIP names."""
    prefixes = (OURS_IMAGE_ENCODER, OURS_TEXT_MODEL, OURS_IMAGE_HEAD, OURS_TEXT_HEAD, OURS_SCALE, OURS_BIAS)
    groups = split_prefixes(state_dict, prefixes, "stage-1 state dict")
    released = {
        **add_prefix(dcformer_to_released(groups[OURS_IMAGE_ENCODER]), RELEASED_VISION),
        **add_prefix(groups[OURS_TEXT_MODEL], RELEASED_LANGUAGE),
        **add_prefix(groups[OURS_IMAGE_HEAD], RELEASED_VISION_HEAD),
        **add_prefix(groups[OURS_TEXT_HEAD], RELEASED_LANGUAGE_HEAD),
    }
    for name, target in ((OURS_SCALE, RELEASED_SCALE), (OURS_BIAS, RELEASED_BIAS)):
        if "" in groups[name]:
            released[target] = groups[name][""].reshape(())
    return released


def load_released_clip(
    path: str | os.PathLike, text_config: Any = None, variant: str | None = None
) -> ReleasedContrastive:
    """The released stage-1 model from its folder (``config.json`` + ``.safetensors`` or ``.bin``).

    Returns ``(model, loss, tokenizer_path)``: a :class:`ContrastiveModel` (DCFormer image tower,
    text tower, both heads) and a :class:`SigLipLoss` holding the released t' and b with the released
    training's symmetric logits, both in eval mode; wrap them in ``ContrastiveModule(model, loss)``
    to evaluate or train further. ``text_config`` (a Hugging Face config, its dict, or a name/folder)
    overrides where the text architecture comes from; ``variant`` is checked against the weights.
    Every tensor must be used and every shape match.
    """
    path = Path(path)
    config = read_config(path)
    _check_supported(config, path)
    groups = split_prefixes(read_weights(weight_files(path)), RELEASED_PREFIXES, f"{path} (DCFormer_SigLIP)")

    try:
        image_encoder = load_released_dcformer(groups[RELEASED_VISION], variant)
    except ReleasedCheckpointError as error:
        raise ReleasedCheckpointError(f"{path}, image encoder (names under {RELEASED_VISION!r}): {error}") from None
    resolved_text_config = _text_config(config, path, text_config)
    text_encoder = ReleasedTextEncoder(resolved_text_config, config.get("language_model_name_or_path"))
    language = {k: v for k, v in groups[RELEASED_LANGUAGE].items() if k not in STALE_TEXT_BUFFERS}
    load_strict(
        text_encoder.model,
        language,
        f"text encoder ({type(text_encoder.model).__name__})",
        _prefixed(RELEASED_LANGUAGE),
    )

    vision_head = groups[RELEASED_VISION_HEAD].get("weight")
    embed_dim = config.get("hidden_size") or (vision_head.shape[0] if vision_head is not None else None)
    model = ContrastiveModel(image_encoder, text_encoder, **({"embed_dim": int(embed_dim)} if embed_dim else {}))
    load_strict(model.image_projection, groups[RELEASED_VISION_HEAD], "image head", _prefixed(RELEASED_VISION_HEAD))
    load_strict(model.text_projection, groups[RELEASED_LANGUAGE_HEAD], "text head", _prefixed(RELEASED_LANGUAGE_HEAD))

    scalars = {}
    for name in (RELEASED_SCALE, RELEASED_BIAS):
        if "" not in groups[name]:
            raise ReleasedCheckpointError(f"{path}: the SigLIP scalar {name!r} is missing from the checkpoint")
        scalars[name] = float(as_scalar(groups[name][""], name))
    # The released training ran SigLIP with logits averaged with their transpose (SPEC §3).
    loss = SigLipLoss.from_preset(
        "released", init_logit_scale=scalars[RELEASED_SCALE], init_logit_bias=scalars[RELEASED_BIAS]
    )
    return ReleasedContrastive(model.eval(), loss.eval(), released_tokenizer_path(path, config))


def released_tokenizer_path(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> str | None:
    """The folder itself when it holds tokenizer files, else its ``language_model_name_or_path``."""
    path = Path(path)
    if any((path / name).exists() for name in TOKENIZER_FILES):
        return str(path)
    config = read_config(path) if config is None else config
    return config.get("language_model_name_or_path")


def _check_supported(config: Mapping[str, Any], path: Path) -> None:
    encoder = config.get("vision_encoder", "dcformer")
    if encoder != "dcformer":
        raise ReleasedCheckpointError(
            f"{path}/config.json: vision_encoder is {encoder!r}; only 'dcformer' checkpoints load"
        )
    loss_type = config.get("loss_type", "sigmoid")
    if loss_type != "sigmoid":
        raise ReleasedCheckpointError(
            f"{path}/config.json: loss_type is {loss_type!r}; "
            "only SigLIP checkpoints ('sigmoid', with t_prime and bias) load"
        )


def _text_config(config: Mapping[str, Any], path: Path, override: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    source = override if override is not None else config.get("text_config")
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, Mapping):
        fields = dict(source)
        if "model_type" not in fields:
            raise ReleasedCheckpointError(f"{path}: text_config needs a 'model_type' (e.g. 'bert', 'distilbert')")
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    name = source or config.get("language_model_name_or_path")
    if not name:
        raise ReleasedCheckpointError(
            f"{path}/config.json names no text model: add 'language_model_name_or_path' or a 'text_config' dict, "
            "or pass text_config="
        )
    local_only = os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return AutoConfig.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ReleasedCheckpointError(
            f"{path}: cannot read the text model's config from {name!r} ({error}). Point text_config= (or "
            "'text_config' in config.json) at the text model's config, or make the name available locally"
        ) from error


def _prefixed(prefix: str):
    return lambda name: prefix + name
