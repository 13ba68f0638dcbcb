"""med3dvlm: 3D vision-language models for CT/MRI volumes (a reproduction of Med3DVLM).

Importing the package is light: sub-packages (``med3dvlm.models``, ``med3dvlm.data``, ...) load
torch, MONAI and transformers only when first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "data", "stages", "eval", "interop")
# Top-level names, imported on first use: name -> module.
_LAZY_EXPORTS = {
    "Med3DVLM": "med3dvlm.models.vlm",
    # using a trained model (README "Using a trained model")
    "load_model": "med3dvlm.api",
    "RetrievalModel": "med3dvlm.api",
    "VisionLanguageModel": "med3dvlm.api",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"med3dvlm.{name}")
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'med3dvlm' has no attribute {name!r}")


__all__ = ["__version__", *_SUBMODULES, *_LAZY_EXPORTS]
