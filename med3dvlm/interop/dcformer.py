"""DCFormer weights of the released code <-> :class:`med3dvlm.models.dcformer.DCFormer`.

Released names (relative to the DCFormer module, so they start with ``encoder.``), SPEC §2 and
``reference/official_state_dicts.json``; ``A`` is the axis 1..3 of a decomposed convolution, whose
slot 0 is the convolution and slot 1 its BatchNorm:

====================================  ===================================================
released                              med3dvlm
====================================  ===================================================
encoder.s0.0.N.cA.0.*                 stages.0.convs.N.branches.(A-1).conv.*
encoder.s0.0.N.cA.1.*                 stages.0.convs.N.branches.(A-1).norm.*
encoder.sI.J.dwconv.cA.0.* / .1.*     stages.I.J.token_mixer.branches.(A-1).conv.* / norm.*
encoder.sI.J.proj.weight              stages.I.J.proj.weight
encoder.sI.J.mlp.mlp.0.* / mlp.mlp.3.*  stages.I.J.mlp.fc1.* / mlp.fc2.*
encoder.sI.J.scale                    stages.I.J.layer_scale
====================================  ===================================================

The rules hold for every variant; the variant itself is read from the weights' shapes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from med3dvlm.interop.checkpoints import read_weights, weight_files
from med3dvlm.interop.naming import (
    NameMapping,
    NameRule,
    ReleasedCheckpointError,
    build_uninitialised,
    load_strict,
)
from med3dvlm.models.dcformer import DCFORMER_VARIANTS, DCFormer
from med3dvlm.models.encoders import apply_speed_options

# The released module keeps its stages under this attribute.
RELEASED_ENCODER_PREFIX = "encoder."
# Where a DCFormer sits inside each released checkpoint (SPEC §8), tried in this order.
RELEASED_DCFORMER_LOCATIONS = (
    "",  # a bare DCFormer state dict
    "vision_encoder.",  # DCFormer_SigLIP (stage 1)
    "model.vision_tower.vision_tower.",  # Med3DVLM-Qwen-2.5-7B, inside the causal LM
    "vision_tower.",  # vision_tower.bin beside the VLM weights (the VisionTower wrapper)
)
# The released VLM folder also stores the vision tower alone (its demo loads this file last).
RELEASED_VISION_TOWER_FILE = "vision_tower.bin"
CUSTOM_VARIANT = "custom"
# The first stem convolution: its shape gives C0 and the input channels.
STEM_WEIGHT = "stages.0.convs.0.branches.0.conv.weight"
# Tensors of a stage's first block whose first dimension is the stage width.
BLOCK_WIDTH_TENSORS = ("layer_scale", "proj.weight", "mlp.fc2.bias", "token_mixer.branches.0.norm.weight")


def _rules() -> list[NameRule]:
    rules = []
    for axis in (1, 2, 3):
        for slot, part in ((0, "conv"), (1, "norm")):
            branch = f"branches.{axis - 1}.{part}.{{param}}"
            rules.append(
                NameRule(f"encoder.s0.0.{{conv}}.c{axis}.{slot}.{{param}}", f"stages.0.convs.{{conv}}.{branch}")
            )
            rules.append(
                NameRule(
                    f"encoder.s{{stage}}.{{block}}.dwconv.c{axis}.{slot}.{{param}}",
                    f"stages.{{stage}}.{{block}}.token_mixer.{branch}",
                )
            )
    rules += [
        NameRule("encoder.s{stage}.{block}.proj.weight", "stages.{stage}.{block}.proj.weight"),
        NameRule("encoder.s{stage}.{block}.mlp.mlp.0.{param}", "stages.{stage}.{block}.mlp.fc1.{param}"),
        NameRule("encoder.s{stage}.{block}.mlp.mlp.3.{param}", "stages.{stage}.{block}.mlp.fc2.{param}"),
        NameRule("encoder.s{stage}.{block}.scale", "stages.{stage}.{block}.layer_scale"),
    ]
    return rules


DCFORMER_NAMES = NameMapping(_rules(), "DCFormer")


def dcformer_from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released DCFormer names (``encoder.s0...``) -> :class:`DCFormer` names; same tensors."""
    _check_no_outer_prefix(state_dict)
    return DCFORMER_NAMES.to_ours(state_dict)


def dcformer_to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`DCFormer` names -> released names; same tensors."""
    return DCFORMER_NAMES.to_released(state_dict)


def released_dcformer_name(name: str) -> str | None:
    return DCFORMER_NAMES.rename(name, to_ours=False)


def infer_dcformer_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``variant`` (or ``"custom"``), ``blocks``, ``channels``, ``in_channels`` read off med3dvlm-named weights.

    Any one tensor of a block tells its width, so a checkpoint missing a few tensors still gets
    its variant, and strict loading then names exactly what is missing.
    """
    stem = state_dict.get(STEM_WEIGHT)
    if stem is None or stem.ndim != 5:
        raise ReleasedCheckpointError(
            f"cannot tell the DCFormer variant: {released_dcformer_name(STEM_WEIGHT)!r} is missing; "
            "pass variant= explicitly to see every missing key"
        )
    blocks, channels = [1], [int(stem.shape[0])]
    for stage in range(1, 5):
        indices = {int(name.split(".")[2]) for name in state_dict if name.startswith(f"stages.{stage}.")}
        widths = [
            int(state_dict[f"stages.{stage}.0.{name}"].shape[0])
            for name in BLOCK_WIDTH_TENSORS
            if f"stages.{stage}.0.{name}" in state_dict
        ]
        if not indices or not widths:
            raise ReleasedCheckpointError(
                f"cannot tell the DCFormer variant: stage s{stage} has no weights; "
                "pass variant= explicitly to see every missing key"
            )
        blocks.append(max(indices) + 1)
        channels.append(widths[0])
    layout = {"blocks": tuple(blocks), "channels": tuple(channels), "in_channels": int(stem.shape[1])}
    variant = next(
        (
            name
            for name, spec in DCFORMER_VARIANTS.items()
            if spec.blocks == layout["blocks"] and spec.channels == layout["channels"]
        ),
        CUSTOM_VARIANT,
    )
    return {"variant": variant, **layout}


def load_released_dcformer(
    state_dict: Mapping[str, torch.Tensor], variant: str | None = None, **options: Any
) -> DCFormer:
    """A :class:`DCFormer` holding released weights, in eval mode (BatchNorm uses running stats).

    ``state_dict`` has the released names relative to the DCFormer (``encoder.s0.0.0.c1.0.weight``,
    ...); cut a checkpoint's outer prefix first (``vision_encoder.``,
    ``model.vision_tower.vision_tower.``). ``variant`` (``nano`` ... ``base``) is checked against
    the weights; None reads it from their shapes. Every tensor must be used and every shape match.
    ``options`` are runtime options of :class:`DCFormer` (``gradient_checkpointing``, ``dropout``);
    the stem runs without activation, as the released model did (SPEC §2).
    """
    if options.get("stem_activation"):
        raise ValueError(
            "released DCFormer weights were trained with a stem without activation (SPEC §2); "
            "stem_activation=True would compute a different function"
        )
    options.pop("stem_activation", None)
    ours = dcformer_from_released(state_dict)
    if variant is None:
        layout = infer_dcformer_layout(ours)
        variant = layout.pop("variant")
        if variant != CUSTOM_VARIANT:
            del layout["blocks"], layout["channels"]
    elif variant in DCFORMER_VARIANTS:
        stem = ours.get(STEM_WEIGHT)
        layout = {"in_channels": int(stem.shape[1]) if stem is not None and stem.ndim == 5 else 1}
    else:
        raise ValueError(f"unknown DCFormer variant {variant!r}; choose one of {', '.join(DCFORMER_VARIANTS)}")
    encoder = build_uninitialised(lambda: DCFormer(variant, **layout, **options))
    try:
        load_strict(encoder, ours, f"DCFormer {variant!r}", released_dcformer_name)
    except ReleasedCheckpointError as error:
        raise ReleasedCheckpointError(f"{_variant_hint(ours, variant)}{error}") from None
    encoder.build_config = _build_config(encoder, options)
    return encoder.eval()


def released_dcformer_encoder(
    path: str | os.PathLike,
    variant: str | None = None,
    name: str = "dcformer",
    stem_activation: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    **options: Any,
) -> DCFormer:
    """A DCFormer from a released checkpoint, as a drop-in for ``build_encoder`` in Hydra configs.

    ``path`` is a released folder (DCFormer_SigLIP, Med3DVLM-Qwen-2.5-7B) or a weights file
    (``.safetensors`` / ``.bin``); the DCFormer is found under ``vision_encoder.``,
    ``model.vision_tower.vision_tower.`` or at the top level. In a VLM folder ``vision_tower.bin``
    takes precedence, as in the released demo. ``channels_last`` / ``compile``: the encoder config's
    speed options (:func:`med3dvlm.models.encoders.apply_speed_options`), not part of the export. Example::

        python -m med3dvlm.train encoder=dcformer_small \\
            encoder._target_=med3dvlm.interop.released_dcformer_encoder +encoder.path=/models/DCFormer_SigLIP
    """
    if name != "dcformer":
        raise ValueError(f"released checkpoints hold a DCFormer; the encoder config asks for {name!r}")
    path = Path(path)
    if path.is_dir():
        files = (
            [path / RELEASED_VISION_TOWER_FILE] if (path / RELEASED_VISION_TOWER_FILE).exists() else weight_files(path)
        )
    elif path.exists():
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist: give a released checkpoint folder or a weights file")
    names_of_interest = tuple(location + RELEASED_ENCODER_PREFIX for location in RELEASED_DCFORMER_LOCATIONS)
    weights = read_weights(files, keep=lambda key: key.startswith(names_of_interest))
    state_dict = extract_released_dcformer(weights, str(path))
    encoder = load_released_dcformer(state_dict, variant, stem_activation=stem_activation, **options)
    return apply_speed_options(encoder, channels_last=channels_last, compile=compile)


def extract_released_dcformer(weights: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The DCFormer's tensors of a checkpoint, with the outer prefix cut (names start ``encoder.``)."""
    for location in RELEASED_DCFORMER_LOCATIONS:
        prefix = location + RELEASED_ENCODER_PREFIX
        found = {name[len(location) :]: t for name, t in weights.items() if name.startswith(prefix)}
        if found:
            return found
    looked = ", ".join(repr(loc + RELEASED_ENCODER_PREFIX) for loc in RELEASED_DCFORMER_LOCATIONS)
    raise ReleasedCheckpointError(f"{source} holds no DCFormer weights: no parameter name starts with {looked}")


def _check_no_outer_prefix(state_dict: Mapping[str, torch.Tensor]) -> None:
    names = list(state_dict)
    if names and not any(name.startswith(RELEASED_ENCODER_PREFIX) for name in names):
        nested = [n for n in names if f".{RELEASED_ENCODER_PREFIX}s0." in n]
        if nested:
            outer = nested[0][: nested[0].index(f".{RELEASED_ENCODER_PREFIX}s0.") + 1]
            raise ReleasedCheckpointError(
                f"the DCFormer weights sit under {outer!r} (e.g. {nested[0]!r}); give the names relative to the "
                f"DCFormer, starting with {RELEASED_ENCODER_PREFIX!r}: "
                f"{{k[len({outer!r}):]: v for k, v in state_dict.items() if k.startswith({outer!r})}}"
            )


def _variant_hint(ours: Mapping[str, torch.Tensor], asked: str) -> str:
    try:
        found = infer_dcformer_layout(ours)
    except ReleasedCheckpointError:
        return ""
    if found["variant"] != asked:
        return (
            f"The weights look like DCFormer variant {found['variant']!r} (blocks {found['blocks']}, "
            f"channels {found['channels']}), not {asked!r}. "
        )
    return ""


def _build_config(encoder: DCFormer, options: Mapping[str, Any]) -> dict[str, Any]:
    """What ``build_encoder`` needs to rebuild this encoder (so stage 1 can export it)."""
    config: dict[str, Any] = {"name": "dcformer", "variant": encoder.variant, "stem_activation": False}
    if encoder.variant == CUSTOM_VARIANT:
        config.update(blocks=list(encoder.blocks), channels=list(encoder.channels))
    in_channels = encoder.stages[0].convs[0].branches[0].conv.in_channels
    if in_channels != 1:
        config["in_channels"] = in_channels
    config.update(options)
    return config
