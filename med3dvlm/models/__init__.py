"""Plain ``nn.Module`` networks: encoders, projectors, losses and the vision-language model.

Nothing here imports Lightning; stages in :mod:`med3dvlm.stages` train these modules.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DCFormer": "dcformer",
    "DCFORMER_VARIANTS": "dcformer",
    "DecomposedConv3d": "dcformer",
    "ViT3D": "vit3d",
    "build_encoder": "encoders",
    "SigLipLoss": "losses",
    "ClipLoss": "losses",
    "MixerProjector": "projectors",
    "build_projector": "projectors",
    "Med3DVLM": "vlm",
    "build_vlm": "vlm",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"med3dvlm.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'med3dvlm.models' has no attribute {name!r}")


__all__ = list(_EXPORTS)
