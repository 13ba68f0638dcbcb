"""Generation samples/s of the VLM, batched against one sample at a time (tiny LLM, greedy, KV cache).

    make bench
    python experiments/benchmarks/bench_generation.py [--samples 16] [--new-tokens 32] [--batch-sizes 1 4 16]

The model is the shipped stage-2 default (``experiment=pretrain``: DCFormer-nano, the small Mixer,
the randomly initialised 4-layer Qwen2 of ``llm=tiny`` with the real Qwen tokenizer) at its
phantom volume size. Every sample generates exactly ``--new-tokens`` tokens (``min_new_tokens``),
so batch sizes do the same work; answers of a batch are compared with the one-at-a-time answers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "generation"
QUESTIONS = [
    "What plane is this scan?",
    "Which organ shows an abnormality?",
    "Describe the findings.",
    "Is there a lesion in the liver?",
]


def build_model(workdir: Path):
    import hydra

    cfg = harness.compose_train_config(["experiment=pretrain", "llm=tiny"], workdir)
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model.model).eval()
    return model, tuple(cfg.data.image_size)


def generate_all(model, volumes: torch.Tensor, questions: list[str], batch_size: int, new_tokens: int) -> list[str]:
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        answers += model.answer(
            volumes[start : start + batch_size], questions[start : start + batch_size],
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        )  # fmt: skip
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=None, help="questions answered per setting (default 16; 4 with --quick)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per sample (default 32; 4 with --quick)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 4 16 (1 4 with --quick)")
    args = parser.parse_args(argv)
    harness.configure(args, default_repeats=2)
    args.samples = args.samples or (4 if args.quick else 16)
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    args.batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 4, 16])
    info = harness.machine()

    with tempfile.TemporaryDirectory(prefix="med3dvlm-bench-") as workdir:
        model, image_size = build_model(Path(workdir))
    generator = torch.Generator().manual_seed(0)
    volumes = torch.rand(args.samples, 1, *image_size, generator=generator)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.samples)]
    print(f"generation: {args.samples} samples x {args.new_tokens} new tokens, greedy, volumes {image_size}, "
          f"{model.num_image_tokens} image tokens, best of {args.repeats} rounds")  # fmt: skip
    print(harness.machine_line(info))

    answers: dict[int, list[str]] = {}
    calls = {}
    for size in args.batch_sizes:

        def call(size=size) -> None:
            answers[size] = generate_all(model, volumes, questions, size, args.new_tokens)

        calls[size] = call
    times = harness.interleaved_times(calls, args.repeats)
    reference = answers[min(args.batch_sizes)]
    rows: list[dict[str, Any]] = []
    for size in args.batch_sizes:
        best = min(times[size])
        rows.append({
            "batch_size": size,
            **harness.summarize(times[size]),
            "samples_per_s": args.samples / best,
            "tokens_per_s": args.samples * args.new_tokens / best,
            "speedup_vs_one_at_a_time": min(times[min(args.batch_sizes)]) / best,
            "answers_equal_to_one_at_a_time": sum(a == b for a, b in zip(answers[size], reference)) / args.samples,
        })  # fmt: skip
    harness.print_table(
        "generation (x one = speed-up over one sample at a time; same = share of answers equal to those)",
        [{**row, "batch_size": str(row["batch_size"])} for row in rows],
        [
            ("batch_size", "batch", ""),
            ("samples_per_s", "samples/s", ".2f"),
            ("tokens_per_s", "tokens/s", ".1f"),
            ("speedup_vs_one_at_a_time", "x one", ".2f"),
            ("best_s", "s (all samples)", ".2f"),
            ("answers_equal_to_one_at_a_time", "same", ".2f"),
        ],
    )
    results = {"samples": args.samples, "new_tokens": args.new_tokens, "image_size": list(image_size), "rows": rows}
    harness.write_json(args, NAME, results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
