"""Seconds per stage-1 training step (SigLIP alignment, SPEC §3) under each training-speed option.

    make bench
    python experiments/benchmarks/bench_train_step.py [--variant small] [--shape 64 128 128] [--batch 2]
        [--steps 3] [--compile] [--quick]

Each option is a command-line override of the shipped config (``experiment=siglip``), built with
Hydra and trained with Lightning exactly as ``python -m med3dvlm.train`` would, on synthetic
batches (random volumes, fixed reports): the step is the module's forward, the loss, backward and
the AdamW update. Options: ``encoder.channels_last=true``, ``encoder.gradient_checkpointing=true``
(per DCFormer stage), ``trainer.precision=bf16-mixed`` and, with ``--compile``,
``encoder.compile=true`` (its first steps, which compile, are reported apart). Under bf16 on a CPU,
DCFormer runs its first convolution in fp32 (a torch 2.13 bug, see ``AxisConvNorm``). The CPU default is
DCFormer-small on 2 x 1 x 64x128x128 (an eighth of the paper's volume) to keep the run short.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "train_step"
DEFAULT_SHAPE, QUICK_SHAPE = (64, 128, 128), (16, 32, 32)
REPORTS = [
    "The liver is enlarged with a 3 cm hypodense lesion in segment 4. No ascites.",
    "Normal chest CT. No nodules or effusion.",
]
OPTIONS = {
    "baseline (fp32)": [],
    "channels-last-3d": ["encoder.channels_last=true"],
    "gradient checkpointing": ["encoder.gradient_checkpointing=true"],
    "bf16 autocast (bf16-mixed)": ["trainer.precision=bf16-mixed"],
}
COMPILE_OPTION = {"torch.compile encoder": ["encoder.compile=true"]}


class StepTimer:
    """A Lightning callback: ``warmup`` untimed steps, one step that measures memory (tensors alive at
    once, and resident-set growth on a CPU), then timed steps."""

    def __init__(self, warmup: int, count_tensors: bool = True) -> None:
        self.warmup = warmup
        self.count_tensors = count_tensors
        self.seconds: list[float] = []
        self.first_steps_s = 0.0
        self.memory: dict[str, float | None] = {"peak_mib": None, "rss_mib": None}

    def callback(self):
        from lightning.pytorch.callbacks import Callback

        timer = self
        device = "cuda" if torch.cuda.is_available() else "cpu"

        class _Callback(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == timer.warmup:
                    self.resident = harness.PeakMemory(device).__enter__()
                    self.live = (
                        harness.LiveTensorPeak().__enter__() if timer.count_tensors and device == "cpu" else None
                    )
                harness.synchronize()
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                harness.synchronize()
                seconds = time.perf_counter() - self.start
                if batch_idx < timer.warmup:
                    timer.first_steps_s += seconds
                elif batch_idx == timer.warmup:
                    if self.live is not None:
                        self.live.__exit__(None, None, None)
                    self.resident.__exit__(None, None, None)
                    resident = harness._mib(self.resident.bytes)
                    tensors = harness._mib(self.live.peak) if self.live is not None else None
                    timer.memory = {"peak_mib": resident if device == "cuda" else tensors,
                                    "rss_mib": None if device == "cuda" else resident}  # fmt: skip
                else:
                    timer.seconds.append(seconds)

        return _Callback()


def synthetic_batches(cfg, args: Any, count: int) -> list[dict[str, Any]]:
    from med3dvlm.models.text_encoder import load_tokenizer

    tokenizer = load_tokenizer(cfg.text_encoder.name_or_path)
    texts = [REPORTS[i % len(REPORTS)] for i in range(args.batch)]
    tokens = tokenizer(
        texts, padding=True, truncation=True, max_length=cfg.text_encoder.max_length, return_tensors="pt"
    )
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(args.batch, 1, *args.shape, generator=generator),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
        }
        for _ in range(count)
    ]


def measure(label: str, overrides: list[str], args: Any, workdir: Path) -> dict[str, Any]:
    import hydra
    import lightning as L

    base = ["experiment=siglip", f"encoder=dcformer_{args.variant}", "trainer.accelerator=auto", "logger=csv"]
    cfg = harness.compose_train_config(base + overrides, workdir / label.replace(" ", "_"))
    L.seed_everything(0, verbose=False)
    module = hydra.utils.instantiate(cfg.model)
    steps = args.warmup + 1 + args.steps  # + the memory step
    # compiled code and Python dispatch modes do not mix: no tensor count for the compiled encoder
    timer = StepTimer(args.warmup, count_tensors="compile" not in " ".join(overrides))
    trainer = L.Trainer(
        accelerator="auto", devices=1, precision=cfg.trainer.precision, max_steps=steps, logger=False,
        callbacks=[timer.callback()], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(workdir),
    )  # fmt: skip
    batches = synthetic_batches(cfg, args, steps)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return {
        "option": label,
        "overrides": " ".join(overrides) or "(none)",
        "first_steps_s": timer.first_steps_s,
        **harness.summarize(timer.seconds),
        "volumes_per_s": args.batch / min(timer.seconds),
        **timer.memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", default=None, help="DCFormer variant (default small; nano with --quick)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per option (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; 1 with --quick)")
    parser.add_argument(
        "--compile", action="store_true", help="add encoder.compile=true (compiles for minutes on a CPU)"
    )
    args = parser.parse_args(argv)
    harness.configure(args, default_repeats=1)
    args.variant = args.variant or ("nano" if args.quick else "small")
    args.shape = tuple(args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE))
    args.steps = args.steps or (1 if args.quick else 3)
    args.warmup = args.warmup or (1 if args.quick else 2)
    info = harness.machine()
    print(f"stage-1 training step: DCFormer-{args.variant} + frozen MiniLM + SigLIP + AdamW, "
          f"{args.batch} x 1 x {' x '.join(map(str, args.shape))}, best of {args.steps} steps after {args.warmup} + 1 (memory)")  # fmt: skip
    print(harness.machine_line(info))
    options = {**OPTIONS, **(COMPILE_OPTION if args.compile else {})}
    with tempfile.TemporaryDirectory(prefix="med3dvlm-bench-") as workdir:
        rows = [measure(label, overrides, args, Path(workdir)) for label, overrides in options.items()]
    baseline = rows[0]["best_s"]
    for row in rows:
        row["speedup_vs_baseline"] = baseline / row["best_s"]
    harness.print_table(
        "stage-1 training step (x base = speed-up over the fp32 baseline)",
        rows,
        [
            ("option", "option", ""),
            ("best_s", "s/step", ".3f"),
            ("median_s", "median", ".3f"),
            ("volumes_per_s", "volumes/s", ".2f"),
            ("speedup_vs_baseline", "x base", ".2f"),
            ("peak_mib", "peak MiB", ".0f"),
            ("rss_mib", "RSS MiB", ".0f"),
            ("first_steps_s", "first steps s", ".1f"),
            ("overrides", "override", ""),
        ],
    )
    harness.write_json(
        args, NAME, {"shape": [args.batch, 1, *args.shape], "variant": args.variant, "steps": rows}, info
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
