"""Volumes/s through the training DataLoader: compressed against the fast volume copies, 0 or 2 workers.

    make bench          # also runs make bench-data (load_volume alone, per file format)
    python experiments/benchmarks/bench_loader.py [--cases 16] [--shape 128 256 256] [--workers 0 2]

Where ``experiments/bench_data.py`` times ``load_volume`` per file format, this times what training
sees: ``M3DCapDataModule.train_dataloader()`` with the SPEC §6 augmentation and the default collate,
over a phantom dataset at the prepared size (SPEC §6: 128x256x256) whose volumes also have the fast
uncompressed ``.nii`` copies (``data.datamodule.volume_format=nii``). Files are read once before
timing (warm page cache); every setting then runs over the whole train split, best of --repeats.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "loader"
PAPER_SHAPE, QUICK_SHAPE = (128, 256, 256), (16, 32, 32)


def make_dataset(root: Path, cases: int, shape: tuple[int, int, int]) -> None:
    from med3dvlm.data.phantoms import make_phantom_dataset
    from med3dvlm.data.prepare import convert_dataset

    make_phantom_dataset(root, num_cases=cases, shape=shape, seed=0)
    convert_dataset(root, workers=1, progress=False)  # the fast .nii copies beside the .nii.gz


def datamodule(root: Path, volume_format: str | None, workers: int, batch_size: int):
    from med3dvlm.data import M3DCapDataModule

    module = M3DCapDataModule(
        root, batch_size=batch_size, num_workers=workers, volume_format=volume_format, seed=0,
        persistent_workers=workers > 0,  # worker start-up is paid in the untimed first pass
    )  # fmt: skip
    module.setup("fit")
    return module


def one_pass(module) -> int:
    volumes = 0
    for batch in module.train_dataloader():
        volumes += batch["image"].shape[0]
    return volumes


def main(argv: list[str] | None = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", type=int, default=None, help="phantom cases (default 16; 6 with --quick); ~70%% train"
    )
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument(
        "--workers", type=int, nargs="+", default=None, help="DataLoader workers to try (default 0 2; 0 with --quick)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the phantoms (default: a temp folder)")
    args = parser.parse_args(argv)
    harness.configure(args, default_repeats=2)
    args.cases = args.cases or (6 if args.quick else 16)
    args.shape = tuple(args.shape or (QUICK_SHAPE if args.quick else PAPER_SHAPE))
    args.workers = args.workers if args.workers is not None else ([0] if args.quick else [0, 2])
    info = harness.machine()
    folder = Path(tempfile.mkdtemp(prefix="med3dvlm-bench-loader-", dir=args.dir))
    try:
        root = folder / "phantoms"
        print(f"making {args.cases} phantom cases of {'x'.join(map(str, args.shape))} ...", file=sys.stderr)
        make_dataset(root, args.cases, args.shape)
        settings = {
            (fmt, workers): datamodule(root, fmt, workers, args.batch)
            for fmt in ("nii.gz", "nii")
            for workers in args.workers
        }
        for module in settings.values():
            one_pass(module)  # page cache warm, imports done
        counts: dict[tuple, int] = {}
        calls = {key: (lambda key=key: counts.__setitem__(key, one_pass(settings[key]))) for key in settings}
        times = harness.interleaved_times(calls, args.repeats, warmup=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"training DataLoader (augmented, batch {args.batch}), {counts[next(iter(counts))]} train volumes of "
          f"{'x'.join(map(str, args.shape))}, best of {args.repeats} passes")  # fmt: skip
    print(harness.machine_line(info))
    baseline = min(times[("nii.gz", args.workers[0])])
    rows: list[dict[str, Any]] = []
    for (fmt, workers), seconds in times.items():
        best = min(seconds)
        rows.append({
            "volume_format": fmt, "workers": workers, **harness.summarize(seconds),
            "volumes_per_s": counts[(fmt, workers)] / best, "speedup_vs_nii_gz": baseline / best,
        })  # fmt: skip
    harness.print_table(
        f"DataLoader throughput (x = over .nii.gz with {args.workers[0]} workers)",
        [{**row, "workers": str(row["workers"])} for row in rows],
        [
            ("volume_format", "volume_format", ""),
            ("workers", "workers", ""),
            ("volumes_per_s", "volumes/s", ".1f"),
            ("speedup_vs_nii_gz", "x", ".2f"),
            ("best_s", "s/pass", ".2f"),
        ],
    )
    harness.write_json(args, NAME, {"shape": list(args.shape), "rows": rows}, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
