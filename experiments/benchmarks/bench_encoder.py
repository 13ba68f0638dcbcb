"""Volumes/s, peak memory and achieved GFLOP/s of the 3D encoders, forward and forward+backward.

    make bench          # all benchmarks
    python experiments/benchmarks/bench_encoder.py [--shape 128 256 256] [--batch 1] [--compile] [--quick]

DCFormer-small (the paper's encoder) and the ViT3D baseline on ``B x 1 x D x H x W`` volumes
(SPEC §2: 1x128x256x256). Forward rows run in eval mode without gradients: the plain module, its
speed variants (channels-last-3d weights, bf16 autocast, ``torch.compile`` with ``--compile``) and
``FastDCFormer`` (med3dvlm.models.fast_encoder), with their largest error relative to the plain
fp32 outputs. Forward+backward rows run in train mode with the training options (channels-last,
stage-wise gradient checkpointing, bf16 autocast). GFLOP/s counts the matmul and convolution FLOPs
of the plain module (torch's FLOP counter on meta tensors), so every row of a model is measured
against the same work; "% peak" divides by this CPU's fp32 matmul rate measured here first.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from med3dvlm.models.dcformer import DCFormer  # noqa: E402
from med3dvlm.models.encoders import apply_speed_options, build_encoder  # noqa: E402
from med3dvlm.models.fast_encoder import FastDCFormer  # noqa: E402

NAME = "encoder"
# On CPUs DCFormer runs its first convolution in fp32 under bf16 autocast (AxisConvNorm._conv_fp32 says why).
BF16_LABEL = "plain, bf16 autocast"
PAPER_SHAPE = (128, 256, 256)  # SPEC §2/§6: prepared volumes are 1 x 128 x 256 x 256
QUICK_SHAPE = (32, 64, 64)
MATMUL_SIZE, QUICK_MATMUL_SIZE = 2048, 256
QUICK_VIT_DEPTH = 2


def bf16_autocast() -> contextlib.AbstractContextManager:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


def output_sum(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A scalar that depends on every output token, for the backward pass."""
    return sum(out.float().mean() for out in outputs)


def vit_options(args: Any) -> dict[str, Any]:
    """The ViT3D of the configs (SPEC §2); --quick keeps 2 of its 12 blocks."""
    return {"image_size": list(args.shape), **({"depth": QUICK_VIT_DEPTH} if args.quick else {})}


def build_models(args: Any, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dcformer = build_encoder("dcformer", variant=args.variant).to(device)
    vit = build_encoder("vit3d", **vit_options(args)).to(device)
    return {"dcformer": dcformer, "vit3d": vit}


def flops_per_volume(name: str, args: Any, backward: bool) -> float:
    """Matmul + convolution FLOPs of one volume, counted on the meta device (nothing computed)."""
    with torch.device("meta"):
        model = DCFormer(args.variant) if name == "dcformer" else build_encoder("vit3d", **vit_options(args))
        volume = torch.empty(1, 1, *args.shape)
    model.eval()  # the counted FLOPs do not depend on the BatchNorm mode; eval allows one volume

    def run() -> None:
        outputs = model(volume)
        if backward:
            output_sum(outputs).backward()

    return float(harness.count_flops(run))


def forward_variants(models: dict[str, torch.nn.Module], args: Any) -> dict[str, tuple[str, Callable, dict]]:
    """name -> (model, callable returning outputs, extra facts)."""
    plain = models["dcformer"].eval()
    channels_last = apply_speed_options(copy.deepcopy(plain), channels_last=True)
    start = time.perf_counter()
    fast = FastDCFormer.from_module(plain)
    build_seconds = time.perf_counter() - start
    vit = models["vit3d"].eval()

    def autocast(module):
        def run(x):
            with bf16_autocast():
                return module(x)

        return run

    variants = {
        "plain fp32": ("dcformer", plain, {}),
        "plain, channels-last-3d weights": ("dcformer", channels_last, {}),
        BF16_LABEL: ("dcformer", autocast(plain), {}),
        "FastDCFormer (BN folded, NDHWC, conv2d/matmul)": ("dcformer", fast, {"build_s": build_seconds}),
    }
    if args.compile:
        variants["plain + torch.compile"] = ("dcformer", torch.compile(plain), {})
    variants["vit3d fp32"] = ("vit3d", vit, {})
    variants["vit3d bf16 autocast"] = ("vit3d", autocast(vit), {})
    return variants


def run_forward(models, args, volume, peak_gflops, flops) -> list[dict[str, Any]]:
    variants = forward_variants(models, args)
    with torch.no_grad():
        references = {
            name: model(volume) for name, model in (("dcformer", models["dcformer"]), ("vit3d", models["vit3d"]))
        }
        rows, calls = [], {}
        for label, (model_name, module, extra) in variants.items():
            start = time.perf_counter()
            outputs = module(volume)  # first call: compile / weight reorders happen here
            first = time.perf_counter() - start
            memory = harness.measure_memory(lambda module=module: module(volume), volume.device)
            rows.append(
                {
                    "variant": label,
                    "model": model_name,
                    "first_call_s": first,
                    **memory,
                    "max_rel_err": harness.relative_error(outputs, references[model_name]),
                    **extra,
                }
            )
            calls[label] = lambda module=module: module(volume)
        times = harness.interleaved_times(calls, args.repeats, warmup=0)
    return finish_rows(rows, times, args, peak_gflops, flops, baseline="plain fp32")


def train_variants(models: dict[str, torch.nn.Module], args: Any) -> dict[str, tuple[str, torch.nn.Module, bool]]:
    """name -> (model, module in train mode, bf16 autocast?)."""
    plain = models["dcformer"].train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    channels_last = apply_speed_options(copy.deepcopy(plain), channels_last=True)
    vit = models["vit3d"].train()
    return {
        "plain fp32": ("dcformer", plain, False),
        "channels-last-3d weights": ("dcformer", channels_last, False),
        "gradient checkpointing (per stage)": ("dcformer", checkpointed, False),
        BF16_LABEL.removeprefix("plain, "): ("dcformer", plain, True),
        "vit3d fp32": ("vit3d", vit, False),
        "vit3d bf16 autocast": ("vit3d", vit, True),
    }


def run_train(models, args, volume, peak_gflops, flops) -> list[dict[str, Any]]:
    rows, calls = [], {}
    for label, (model_name, module, autocast) in train_variants(models, args).items():

        def step(module=module, autocast=autocast) -> None:
            module.zero_grad(set_to_none=True)
            with bf16_autocast() if autocast else contextlib.nullcontext():
                loss = output_sum(module(volume))
            loss.backward()

        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        rows.append({"variant": label, "model": model_name, "first_call_s": first,
                     **harness.measure_memory(step, volume.device)})  # fmt: skip
        calls[label] = step
    times = harness.interleaved_times(calls, args.repeats, warmup=0)
    for module in models.values():
        module.zero_grad(set_to_none=True)
    return finish_rows(rows, times, args, peak_gflops, flops, baseline="plain fp32")


def finish_rows(rows, times, args, peak_gflops, flops, baseline) -> list[dict[str, Any]]:
    best = {label: min(t) for label, t in times.items()}
    for row in rows:
        seconds = best[row["variant"]]
        row.update(harness.summarize(times[row["variant"]]))
        row["volumes_per_s"] = args.batch / seconds
        row["gflops_per_s"] = flops[row["model"]] * args.batch / seconds / 1e9
        row["pct_of_matmul_peak"] = 100 * row["gflops_per_s"] / peak_gflops
        if row["model"] == "dcformer":
            row["speedup_vs_plain"] = best[baseline] / seconds
    return rows


COLUMNS = [
    ("variant", "variant", ""),
    ("volumes_per_s", "volumes/s", ".3f"),
    ("best_s", "s/batch", ".3f"),
    ("speedup_vs_plain", "x plain", ".2f"),
    ("peak_mib", "peak MiB", ".0f"),
    ("rss_mib", "RSS MiB", ".0f"),
    ("gflops_per_s", "GFLOP/s", ".1f"),
    ("pct_of_matmul_peak", "% peak", ".1f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="volumes per call (default 1; 2 with --quick, as\n"
        "train-mode BatchNorm needs more than one value per channel at the 1x1x1 last grid)",
    )
    parser.add_argument("--variant", default="small", help="DCFormer variant (default small, the paper's)")
    parser.add_argument(
        "--compile", action="store_true", help="add a torch.compile row (compiles for minutes on a CPU)"
    )
    parser.add_argument("--skip-train", action="store_true", help="forward rows only")
    args = parser.parse_args(argv)
    harness.configure(args, default_repeats=3)
    args.shape = tuple(args.shape or (QUICK_SHAPE if args.quick else PAPER_SHAPE))
    args.batch = args.batch or (2 if args.quick else 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    peak_gflops = harness.matmul_peak_gflops(QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE, args.repeats, device)
    info = harness.machine()
    print(f"encoders on {args.batch} x 1 x {' x '.join(map(str, args.shape))}, best of {args.repeats} rounds")
    print(harness.machine_line(info))
    print(f"fp32 matmul peak (square {QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE}): {peak_gflops:.1f} GFLOP/s")

    models = build_models(args, device)
    volume = torch.rand(args.batch, 1, *args.shape, device=device)
    forward_flops = {name: flops_per_volume(name, args, backward=False) for name in models}
    train_flops = {name: flops_per_volume(name, args, backward=True) for name in models}
    for name in models:
        print(
            f"{name}: {forward_flops[name] / 1e9:.1f} GFLOP forward, {train_flops[name] / 1e9:.1f} GFLOP forward+backward per volume"
        )

    forward_rows = run_forward(models, args, volume, peak_gflops, forward_flops)
    harness.print_table(f"forward, eval mode (DCFormer-{args.variant}; x plain = speed-up over the plain module)",
                        forward_rows, COLUMNS + [("max_rel_err", "max rel err", ".1e")])  # fmt: skip
    if not torch.cuda.is_available():
        print("(bf16 on a CPU: DCFormer keeps its first convolution, one input channel, in fp32; "
              "torch 2.13's CPU bf16 conv3d crashes on it, see med3dvlm.models.dcformer.AxisConvNorm)")  # fmt: skip
    train_rows = [] if args.skip_train else run_train(models, args, volume, peak_gflops, train_flops)
    if train_rows:
        harness.print_table("forward + backward, train mode", train_rows, COLUMNS)
    fast = next(row for row in forward_rows if row["variant"].startswith("FastDCFormer"))
    print(f"\nFastDCFormer: {fast['speedup_vs_plain']:.2f}x the plain module's forward throughput, "
          f"max relative error {fast['max_rel_err']:.1e}")  # fmt: skip
    info = {**info, "load_average_after": list(harness.machine()["load_average_1_5_15min"] or [])}
    results = {
        "shape": [args.batch, 1, *args.shape],
        "matmul_peak_gflops": peak_gflops,
        "flops_per_volume": {"forward": forward_flops, "forward_backward": train_flops},
        "forward": forward_rows,
        "forward_backward": train_rows,
        "fast_speedup": fast["speedup_vs_plain"],
    }
    harness.write_json(args, NAME, results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
