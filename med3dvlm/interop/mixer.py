"""The released Mixer projector's weights <-> :class:`med3dvlm.models.projectors.MixerProjector`.

Released names (relative to ``mm_projector.``; ``reference/official_state_dicts.json``), for each
stream ``low`` / ``high`` and mixer layer ``L``::

    {stream}_mixer.L.ln1.*, {stream}_mixer.L.ln2.*                    LayerNorms over d_in
    {stream}_mixer.L.mlp{1,2}.mm_projector.0.*                        first Linear (token / channel MLP)
    {stream}_mixer.L.mlp{1,2}.mm_projector.K.1.*  (K >= 1)            GELU + Linear pairs

:class:`MixerProjector` keeps this module structure, so the rule table is the identity; it still
makes the converter strict (a name outside these patterns is an error) and is the one place to
change should either side rename.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from med3dvlm.interop.naming import NameMapping, NameRule, ReleasedCheckpointError, build_uninitialised, load_strict
from med3dvlm.models.projectors import MixerProjector

STREAMS = ("low", "high")
# Sizes of MixerProjector that the weights determine.
MIXER_SIZE_NAMES = (
    "low_input_size",
    "low_output_size",
    "high_input_size",
    "high_output_size",
    "output_dim",
    "depth",
    "mlp_depth",
)


def _rules() -> list[NameRule]:
    rules = []
    for stream in STREAMS:
        layer = f"{stream}_mixer.{{layer}}"
        rules += [
            NameRule(f"{layer}.ln{{norm}}.{{param}}", f"{layer}.ln{{norm}}.{{param}}"),
            NameRule(f"{layer}.mlp{{mlp}}.mm_projector.0.{{param}}", f"{layer}.mlp{{mlp}}.mm_projector.0.{{param}}"),
            NameRule(
                f"{layer}.mlp{{mlp}}.mm_projector.{{linear}}.1.{{param}}",
                f"{layer}.mlp{{mlp}}.mm_projector.{{linear}}.1.{{param}}",
            ),
        ]
    return rules


MIXER_NAMES = NameMapping(_rules(), "Mixer projector")


def mixer_from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released Mixer names (relative to ``mm_projector.``) -> :class:`MixerProjector` names."""
    for name in state_dict:
        for stream in STREAMS:
            marker = f"{stream}_mixer."
            if marker in name and not name.startswith(marker):
                outer = name[: name.index(marker)]
                raise ReleasedCheckpointError(
                    f"the Mixer weights sit under {outer!r} (e.g. {name!r}); give the names relative to it, "
                    f"starting with {marker!r}"
                )
    return MIXER_NAMES.to_ours(state_dict)


def mixer_to_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return MIXER_NAMES.to_released(state_dict)


def released_mixer_name(name: str) -> str | None:
    return MIXER_NAMES.rename(name, to_ours=False)


def infer_mixer_sizes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`MixerProjector` sizes that med3dvlm-named Mixer weights were made with.

    Token MLPs map ``n_in -> n_out`` (``mlp1``), channel MLPs ``d_in -> d_out`` (``mlp2``);
    ``ln1`` has width ``d_in``.
    """
    sizes: dict[str, Any] = {}
    try:
        for stream in STREAMS:
            depth = 0
            while f"{stream}_mixer.{depth}.ln1.weight" in state_dict:
                depth += 1
            if depth == 0:
                raise KeyError(f"{stream}_mixer.0.ln1.weight")
            first_token_mlp = state_dict[f"{stream}_mixer.0.mlp1.mm_projector.0.weight"]
            sizes[f"{stream}_input_size"] = (
                int(first_token_mlp.shape[1]),
                int(state_dict[f"{stream}_mixer.0.ln1.weight"].shape[0]),
            )
            sizes[f"{stream}_output_size"] = tuple(
                int(state_dict[f"{stream}_mixer.{i}.mlp1.mm_projector.0.weight"].shape[0]) for i in range(depth)
            )
            sizes.setdefault("depth", depth)
        depth = sizes["depth"]
        sizes["output_dim"] = int(state_dict[f"low_mixer.{depth - 1}.mlp2.mm_projector.0.weight"].shape[0])
        mlp_depth = 1
        while f"low_mixer.0.mlp1.mm_projector.{mlp_depth}.1.weight" in state_dict:
            mlp_depth += 1
        sizes["mlp_depth"] = mlp_depth
    except KeyError as error:
        raise ReleasedCheckpointError(
            f"cannot read the Mixer projector's sizes: parameter {error.args[0]!r} is missing; "
            f"pass the sizes ({', '.join(MIXER_SIZE_NAMES)}) explicitly to see every missing key"
        ) from None
    return sizes


def load_released_mixer(state_dict: Mapping[str, torch.Tensor], **sizes: Any) -> MixerProjector:
    """A :class:`MixerProjector` holding released Mixer weights (names relative to ``mm_projector.``).

    ``sizes`` are :class:`MixerProjector` arguments (``low_input_size=(256, 384)``,
    ``output_dim=3584``, ...); those not given are read from the weights' shapes, and every given
    one is checked against them (a mismatch is a shape error naming the parameter).
    """
    unknown = set(sizes) - set(MIXER_SIZE_NAMES)
    if unknown:
        raise TypeError(f"unknown Mixer size(s) {sorted(unknown)}; known: {', '.join(MIXER_SIZE_NAMES)}")
    ours = mixer_from_released(state_dict)
    if set(sizes) != set(MIXER_SIZE_NAMES):
        sizes = {**infer_mixer_sizes(ours), **sizes}
    projector = build_uninitialised(lambda: MixerProjector(**sizes))
    load_strict(projector, ours, "Mixer projector", released_mixer_name)
    return projector.eval()
