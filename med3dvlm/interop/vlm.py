"""The released VLM (Med3DVLM-Qwen-2.5-7B) <-> :class:`med3dvlm.models.vlm.Med3DVLM`.

Released names (SPEC §8) and med3dvlm's (``Med3DVLM.state_dict()``):

=========================================  ===================================================
released                                   med3dvlm
=========================================  ===================================================
model.vision_tower.vision_tower.encoder.*  image_encoder.stages.*  (DCFormer rules, interop.dcformer)
model.mm_projector.*                       projector.*             (Mixer rules, interop.mixer)
model.embed_tokens / layers / norm, lm_head  language_model.*      (the transformers model, unchanged)
=========================================  ===================================================

The released folder is a transformers causal-LM folder whose ``config.json`` is a Qwen2 config
(``model_type: "vlm_qwen"``) plus the VLM's fields. Read here, with the default when absent:

- ``model_type``: ``vlm_qwen`` means ``qwen2``; a standard transformers type is used as is. The LLM
  is built with transformers' own classes (no ``trust_remote_code``) and loaded strictly.
- ``vision_tower`` (``"dcformer"``; the variant comes from the weights), ``mm_projector_type``
  (``"mixer"``), ``vision_select_layer`` (``-2``, SPEC §4): other values are refused.
- ``input_size``: the released ``(H, W, D)``, default ``(256, 256, 128)``, i.e. volumes of
  ``(D, H, W) = (128, 256, 256)`` (SPEC §2).
- ``low_input_size``, ``high_input_size``, ``low_output_size``, ``high_output_size``,
  ``mm_mlp_depth``, ``hidden_size`` (the Mixer's output width), ``proj_out_num`` (image tokens):
  read off the weights when absent (SPEC §4 values for the release), checked against them when given.
- ``dtype`` / ``torch_dtype``: the LLM's dtype unless ``dtype=`` is passed (float32 when absent).

``vision_tower.bin`` beside the weights (the released VisionTower alone) replaces the vision
weights of the main checkpoint, as the released demo loads it. The tokenizer is the folder's (the
released one already holds ``<im_patch>``).

The loaded model runs with ``released_splice=True``: the image features over positions 1..N after
the first token and a space before VQA questions, as the released weights were trained (SPEC §5);
``save_pretrained`` records it, so an export keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from med3dvlm.interop.checkpoints import read_config, read_weights, weight_files
from med3dvlm.interop.dcformer import (
    RELEASED_ENCODER_PREFIX,
    RELEASED_VISION_TOWER_FILE,
    dcformer_from_released,
    dcformer_to_released,
    load_released_dcformer,
)
from med3dvlm.interop.mixer import infer_mixer_sizes, load_released_mixer, mixer_from_released, mixer_to_released
from med3dvlm.interop.naming import ReleasedCheckpointError, add_prefix, format_names, load_strict

logger = logging.getLogger(__name__)

RELEASED_VISION = "model.vision_tower.vision_tower."
RELEASED_PROJECTOR = "model.mm_projector."
# Names in vision_tower.bin (the VisionTower module's own state dict).
RELEASED_VISION_TOWER_BIN_PREFIX = "vision_tower."
OURS_VISION = "image_encoder."
OURS_PROJECTOR = "projector."
OURS_LLM = "language_model."
# The released config's model types and the transformers types that compute the same LLM.
RELEASED_LLM_TYPES = {"vlm_qwen": "qwen2"}
# Fields of the released config that describe the vision side, not the LLM.
VISION_CONFIG_FIELDS = (
    "vision_tower",
    "vision_select_layer",
    "vision_select_feature",
    "mm_projector_type",
    "mm_mlp_depth",
    "mm_hidden_size",
    "proj_out_num",
    "low_input_size",
    "high_input_size",
    "low_output_size",
    "high_output_size",
    "input_size",
    "patch_size",
    "dim",
    "depth",
    "img_token_id",
    "num_new_tokens",
)
# SPEC §2 / §4 defaults for fields the config may leave out.
RELEASED_INPUT_SIZE_HWD = (256, 256, 128)
RELEASED_VISION_SELECT_LAYER = -2


def vlm_from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released VLM names -> :class:`Med3DVLM` names (``image_encoder.``, ``projector.``, ``language_model.``)."""
    vision, projector, llm = _split_released(state_dict)
    return {
        **add_prefix(dcformer_from_released(vision), OURS_VISION),
        **add_prefix(mixer_from_released(projector), OURS_PROJECTOR),
        **add_prefix(llm, OURS_LLM),
    }


def vlm_to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`Med3DVLM` names -> released VLM names (merge LoRA first: ``vlm.merge_lora()``)."""
    groups: dict[str, dict[str, torch.Tensor]] = {OURS_VISION: {}, OURS_PROJECTOR: {}, OURS_LLM: {}}
    unknown = []
    for name, tensor in state_dict.items():
        prefix = next((p for p in groups if name.startswith(p)), None)
        if prefix is None:
            unknown.append(name)
        else:
            groups[prefix][name[len(prefix) :]] = tensor
    if unknown:
        raise ReleasedCheckpointError(f"Med3DVLM state dict: names under no known part: {format_names(unknown)}")
    if any(name.startswith("base_model.model.") for name in groups[OURS_LLM]):
        raise ReleasedCheckpointError("the LLM still carries LoRA adapters: call vlm.merge_lora() before converting")
    return {
        **add_prefix(dcformer_to_released(groups[OURS_VISION]), RELEASED_VISION),
        **add_prefix(mixer_to_released(groups[OURS_PROJECTOR]), RELEASED_PROJECTOR),
        **groups[OURS_LLM],
    }


def load_released_vlm(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | os.PathLike | None = None,
):
    """The released VLM folder as a :class:`Med3DVLM` in eval mode, ready for generation, for
    ``save_pretrained`` (med3dvlm's format) and for further training, with the released splice and
    prompt form (``released_splice=True``, SPEC §5).

    ``dtype`` sets the LLM's dtype (default: the config's, else float32); the encoder and projector
    stay float32. ``tokenizer`` overrides where the tokenizer is read from (default: the folder).
    Every tensor must be used and every shape match; errors name the released key.
    """
    from transformers import AutoTokenizer

    from med3dvlm.models.llm import IMAGE_TOKEN, add_image_token_to_tokenizer
    from med3dvlm.models.vlm import Med3DVLM, encoder_token_shapes

    path = Path(path)
    config = read_config(path)
    _check_supported(config, path)
    vision, projector_weights, llm_weights = _split_released(read_weights(weight_files(path)))
    tower_file = path / RELEASED_VISION_TOWER_FILE
    if tower_file.exists():
        logger.info("vision weights from %s (as the released demo loads them)", tower_file)
        vision = _vision_tower_bin(tower_file)
    if not vision:
        raise ReleasedCheckpointError(f"{path}: no vision tower weights (names under {RELEASED_VISION!r})")

    try:
        image_encoder = load_released_dcformer(vision)
    except ReleasedCheckpointError as error:
        raise ReleasedCheckpointError(f"{path}, vision tower (names under {RELEASED_VISION!r}): {error}") from None
    try:
        projector = load_released_mixer(projector_weights, **_mixer_sizes_from_config(config))
    except ReleasedCheckpointError as error:
        raise ReleasedCheckpointError(f"{path}, projector (names under {RELEASED_PROJECTOR!r}): {error}") from None
    language_model = _load_language_model(config, llm_weights, dtype, path)

    image_size = _image_size(config)
    shapes = encoder_token_shapes(image_encoder, image_size)
    if (tuple(shapes[-2]), tuple(shapes[-1])) != (projector.low_input_size, projector.high_input_size):
        raise ReleasedCheckpointError(
            f"{path}: at volumes of (D, H, W) = {image_size} (config input_size {config.get('input_size')}) the "
            f"encoder gives stage tokens {tuple(shapes[-2])} and {tuple(shapes[-1])}, but the projector takes "
            f"{projector.low_input_size} and {projector.high_input_size}; fix input_size in config.json"
        )
    proj_out_num = config.get("proj_out_num")
    if proj_out_num is not None and proj_out_num != projector.num_tokens:
        raise ReleasedCheckpointError(
            f"{path}/config.json: proj_out_num is {proj_out_num} but the projector emits {projector.num_tokens} tokens"
        )

    loaded_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or path))
    image_token_id = add_image_token_to_tokenizer(loaded_tokenizer)
    rows = language_model.get_input_embeddings().weight.shape[0]
    if image_token_id >= rows:
        raise ReleasedCheckpointError(
            f"{tokenizer or path}: the tokenizer's {IMAGE_TOKEN} has id {image_token_id} but the LLM has only {rows} "
            "embedding rows; the released tokenizer (with the token added at training time) belongs with these weights"
        )
    sizes = infer_mixer_sizes(projector.state_dict())
    projector_config = {"name": "mixer", **{k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}}
    vlm = Med3DVLM(
        image_encoder, projector, language_model, loaded_tokenizer, image_size, projector_config, released_splice=True
    )
    return vlm.eval()


def _split_released(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    vision, projector, llm = {}, {}, {}
    for name, tensor in state_dict.items():
        if name.startswith(RELEASED_VISION):
            vision[name[len(RELEASED_VISION) :]] = tensor
        elif name.startswith(RELEASED_PROJECTOR):
            projector[name[len(RELEASED_PROJECTOR) :]] = tensor
        else:
            llm[name] = tensor
    return vision, projector, llm


def _vision_tower_bin(file: Path) -> dict[str, torch.Tensor]:
    weights = read_weights(file)
    prefix = RELEASED_VISION_TOWER_BIN_PREFIX
    stray = [name for name in weights if not name.startswith(prefix + RELEASED_ENCODER_PREFIX)]
    if stray:
        raise ReleasedCheckpointError(
            f"{file}: expected names under {prefix + RELEASED_ENCODER_PREFIX!r}, got {format_names(stray)}"
        )
    return {name[len(prefix) :]: tensor for name, tensor in weights.items()}


def _check_supported(config: Mapping[str, Any], path: Path) -> None:
    checks = (
        ("vision_tower", "dcformer"),
        ("mm_projector_type", "mixer"),
        ("vision_select_layer", RELEASED_VISION_SELECT_LAYER),
    )
    for key, supported in checks:
        value = config.get(key, supported)
        if value != supported:
            raise ReleasedCheckpointError(
                f"{path}/config.json: {key} is {value!r}; med3dvlm loads the released Med3DVLM ({key} = {supported!r})"
            )


def _mixer_sizes_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Mixer sizes the config states (the rest are read off the weights)."""
    sizes: dict[str, Any] = {}
    for key in ("low_input_size", "high_input_size", "low_output_size", "high_output_size"):
        if config.get(key) is not None:
            sizes[key] = tuple(int(n) for n in config[key])
    if config.get("mm_mlp_depth") is not None:
        sizes["mlp_depth"] = int(config["mm_mlp_depth"])
    if config.get("hidden_size") is not None:
        sizes["output_dim"] = int(config["hidden_size"])
    if "low_output_size" in sizes:
        sizes["depth"] = len(sizes["low_output_size"])
    return sizes


def _image_size(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """The released ``input_size`` is (H, W, D), the encoder's permuted layout; med3dvlm uses (D, H, W)."""
    height, width, depth = (int(n) for n in config.get("input_size") or RELEASED_INPUT_SIZE_HWD)
    return depth, height, width


def _llm_config(config: Mapping[str, Any], path: Path):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in VISION_CONFIG_FIELDS}
    released_type = fields.pop("model_type", None)
    if released_type is None:
        raise ReleasedCheckpointError(f"{path}/config.json has no model_type (the released VLM says 'vlm_qwen')")
    fields.pop("architectures", None)  # the released class is not in transformers; ours is picked by type
    for dtype_field in ("dtype", "torch_dtype"):  # chosen by the loader (its dtype= argument)
        fields.pop(dtype_field, None)
    model_type = RELEASED_LLM_TYPES.get(released_type, released_type)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise ReleasedCheckpointError(
            f"{path}/config.json: model_type {released_type!r} is neither a released type "
            f"({', '.join(RELEASED_LLM_TYPES)}) nor one transformers knows"
        ) from error


def _load_language_model(
    config: Mapping[str, Any], weights: dict[str, torch.Tensor], dtype: str | torch.dtype | None, path: Path
) -> nn.Module:
    """The LLM built by transformers' own class for the config, every weight loaded strictly."""
    from transformers import AutoModelForCausalLM

    llm_config = _llm_config(config, path)
    chosen = dtype or config.get("dtype") or config.get("torch_dtype") or "float32"
    torch_dtype = getattr(torch, chosen) if isinstance(chosen, str) else chosen
    with _no_weight_init():  # every weight is loaded next; random init of a 7B model takes minutes
        model = AutoModelForCausalLM.from_config(llm_config, dtype=torch_dtype)
    weights = dict(weights)
    _fill_tied_weights(model, weights)
    load_strict(model, weights, f"{path}: LLM ({type(model).__name__})")
    return model.eval()


def _fill_tied_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Checkpoints store a tied matrix once (e.g. the LM head tied to the embeddings): give the
    other names the stored tensor, so strict loading does not count them as missing."""
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(parameter), name)
        if first != name:
            if name not in weights and first in weights:
                weights[name] = weights[first]
            elif first not in weights and name in weights:
                weights[first] = weights[name]


def _no_weight_init():
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:
        try:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover - initialise normally, only slower
            return contextlib.nullcontext()
    return no_init_weights()
