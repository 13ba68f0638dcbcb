"""Peak memory and time of the SigLIP loss, forward + backward: full N x N logits against chunked.

    make bench
    python experiments/benchmarks/bench_siglip_loss.py [--batch-sizes 1024 4096 8192] [--chunk-size 256]

``SigLipLoss()`` forms the whole N x N logit matrix (and its label, log-sigmoid and gradient
companions); ``SigLipLoss(chunked=True, chunk_size=c)`` (``loss=siglip_chunked``) walks the texts
``c`` at a time and recomputes each block in backward, so it holds N x c blocks. Both give the same
loss and gradients; the table shows both, and their largest difference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from med3dvlm.models.losses import SigLipLoss  # noqa: E402

NAME = "siglip_loss"
EMBED_DIM = 768  # SPEC §3 shared width


def features(n: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.normalize(torch.randn(n, EMBED_DIM, generator=generator), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(n, EMBED_DIM, generator=generator), dim=-1).to(device).requires_grad_()
    return image, text


def forward_backward(loss: SigLipLoss, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    image.grad = text.grad = None
    value = loss(image, text)
    value.backward()
    return value.detach(), image.grad, text.grad


def main(argv: list[str] | None = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default 1024 4096 8192 (64 256 with --quick)"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="texts per block (default 256; 32 with --quick)")
    args = parser.parse_args(argv)
    harness.configure(args, default_repeats=3)
    args.batch_sizes = args.batch_sizes or ([64, 256] if args.quick else [1024, 4096, 8192])
    args.chunk_size = args.chunk_size or (32 if args.quick else 256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = harness.machine()
    print(f"SigLIP loss forward + backward, features {EMBED_DIM}-d fp32, chunk size {args.chunk_size}, "
          f"best of {args.repeats} rounds")  # fmt: skip
    print(harness.machine_line(info))

    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)
    for n in args.batch_sizes:
        image, text = features(n, generator, device)
        losses = {
            "full": SigLipLoss().to(device),
            "chunked": SigLipLoss(chunked=True, chunk_size=args.chunk_size).to(device),
        }
        results, peaks = {}, {}
        for name, loss in losses.items():
            results[name] = forward_backward(loss, image, text)  # warm-up, and the values compared below
            peaks[name] = harness.measure_memory(
                lambda loss=loss, image=image, text=text: forward_backward(loss, image, text), device
            )
        times = harness.interleaved_times(
            {name: (lambda loss=loss, image=image, text=text: forward_backward(loss, image, text)) for name, loss in losses.items()},
            args.repeats, warmup=0,
        )  # fmt: skip
        difference = harness.relative_error(results["chunked"], results["full"])
        logits_mib = n * n * 4 / harness.MIB
        for name in losses:
            rows.append({
                "batch": n,
                "loss": name,
                **harness.summarize(times[name]),
                **peaks[name],
                "one_logit_matrix_mib": logits_mib,
                "max_rel_diff_vs_full": difference if name == "chunked" else 0.0,
            })  # fmt: skip
    full_peaks = {row["batch"]: row["peak_mib"] for row in rows if row["loss"] == "full"}
    for row in rows:
        if row["peak_mib"] and full_peaks.get(row["batch"]):
            row["memory_vs_full"] = row["peak_mib"] / full_peaks[row["batch"]]
    harness.print_table(
        "SigLIP loss, forward + backward (peak = tensors alive at once; N x N = one fp32 logit matrix)",
        [{**row, "batch": str(row["batch"])} for row in rows],
        [
            ("batch", "N", ""),
            ("loss", "loss", ""),
            ("peak_mib", "peak MiB", ".1f"),
            ("rss_mib", "RSS MiB", ".1f"),
            ("memory_vs_full", "x full", ".2f"),
            ("one_logit_matrix_mib", "N x N MiB", ".1f"),
            ("best_s", "seconds", ".3f"),
            ("max_rel_diff_vs_full", "max rel diff", ".1e"),
        ],
    )
    harness.write_json(args, NAME, {"embed_dim": EMBED_DIM, "chunk_size": args.chunk_size, "rows": rows}, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
