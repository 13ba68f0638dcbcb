"""Released Med3DVLM checkpoints <-> med3dvlm models (SPEC §8).

Converters rename whole state dicts in both directions (``*_from_released`` / ``*_to_released``);
loaders build the med3dvlm module, load strictly (every tensor used, every shape checked, errors
naming the released key) and return it in eval mode:

- :func:`load_released_dcformer` (any released variant) and :func:`released_dcformer_encoder`
  (a ``build_encoder``-compatible factory for Hydra configs);
- :func:`load_released_mixer` (the Mixer projector; sizes read from the weights);
- :func:`load_released_clip` (the DCFormer_SigLIP folder -> ``ContrastiveModel`` + ``SigLipLoss``);
- :func:`load_released_vlm` (the Med3DVLM-Qwen-2.5-7B folder -> ``Med3DVLM``).
"""

from med3dvlm.interop.clip import (
    ReleasedContrastive,
    clip_from_released,
    clip_to_released,
    load_released_clip,
    released_tokenizer_path,
)
from med3dvlm.interop.dcformer import (
    dcformer_from_released,
    dcformer_to_released,
    infer_dcformer_layout,
    load_released_dcformer,
    released_dcformer_encoder,
)
from med3dvlm.interop.mixer import infer_mixer_sizes, load_released_mixer, mixer_from_released, mixer_to_released
from med3dvlm.interop.naming import ReleasedCheckpointError
from med3dvlm.interop.vlm import load_released_vlm, vlm_from_released, vlm_to_released

__all__ = [
    "ReleasedCheckpointError",
    "ReleasedContrastive",
    "clip_from_released",
    "clip_to_released",
    "dcformer_from_released",
    "dcformer_to_released",
    "infer_dcformer_layout",
    "infer_mixer_sizes",
    "load_released_clip",
    "load_released_dcformer",
    "load_released_mixer",
    "load_released_vlm",
    "mixer_from_released",
    "mixer_to_released",
    "released_dcformer_encoder",
    "released_tokenizer_path",
    "vlm_from_released",
    "vlm_to_released",
]
