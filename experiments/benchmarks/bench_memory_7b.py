"""Does the paper's stage-3 fine-tune (Qwen2.5-7B + LoRA, batch 8) fit one 80 GB GPU? Measured, then scaled.

    make bench
    python experiments/benchmarks/bench_memory_7b.py [--quick]

Each component's training memory is measured on a small model with the real structure and scaled
by the known sizes, and the arithmetic is printed line by line:

* LLM activations per token and layer: a Qwen2 decoder stack (head dim 128, MLP ratio 18944/3584,
  bf16 weights, LoRA r=16 alpha 32 dropout 0.05 on every Linear, train mode), measured at two widths
  and two depths at the paper's sequence (256 image + 512 text tokens), with and without Hugging
  Face gradient checkpointing; per layer = the difference between depths, scaled linearly in width
  (the two widths show how linear it is) to hidden 3584.
* LM head + loss per label token: the real 152k-entry Qwen vocabulary, so only the width is scaled.
* DCFormer-small training activations per volume: measured at two volume sizes (the ratio shows
  they scale with voxels), scaled to 128x256x256, fp32 and bf16 autocast, with and without
  stage-wise checkpointing.
* The paper's Mixer projector (47.2M parameters at width 3584) at full size, per sample.
* Parameters, gradients and AdamW states from the parameter counts (LoRA's counted by formula,
  checked against peft on the small model).

Measured with ``harness.LiveTensorPeak`` (tensor storage alive at once): for the LLM the bytes alive
after the forward pass (what backward needs), plus one recomputed layer when checkpointing; for the
LM head and DCFormer the peak over forward + backward (the backward starts at the loss while all
activations are alive; DCFormer's recompute of a checkpointed stage happens inside it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "memory_7b"
GB = 1e9

# Qwen2.5-7B-Instruct (its config.json): the paper's LLM (SPEC §1, §5).
QWEN7B_PARAMS = 7.6e9
QWEN7B_HIDDEN, QWEN7B_LAYERS, QWEN7B_INTERMEDIATE = 3584, 28, 18944
QWEN7B_HEADS, QWEN7B_KV_HEADS, QWEN7B_VOCAB = 28, 4, 152064
HEAD_DIM = 128
# SPEC §2, §4, §5: encoder, projector, LoRA and batch of stage 3.
DCFORMER_SMALL_PARAMS = 18_244_800
MIXER_PARAMS = 47_221_248
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
BATCH, IMAGE_TOKENS, TEXT_TOKENS = 8, 256, 512
SEQUENCE = IMAGE_TOKENS + TEXT_TOKENS
PAPER_VOLUME = (128, 256, 256)
GPU_MEMORY_GB = 80.0
# What the framework itself holds on the GPU (CUDA context, cuBLAS/cuDNN workspaces, allocator
# fragmentation): an assumption, not a measurement here, stated as such.
MARGIN_GB = 4.0
# bytes per trainable parameter with mixed precision: fp32 master weight 4 + fp32 gradient 4 +
# AdamW moments 8 (the bf16 working copy of the LLM's rows is counted with the LLM weights).
TRAINABLE_BYTES = 16


def lora_parameters(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, rank: int) -> int:
    """r x (in + out) for q, k, v, o, gate, up and down of every decoder layer."""
    kv = kv_heads * HEAD_DIM
    shapes = [(hidden, heads * HEAD_DIM), (hidden, kv), (hidden, kv), (heads * HEAD_DIM, hidden),
              (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]  # fmt: skip
    return layers * sum(rank * (i + o) for i, o in shapes)


def small_qwen(hidden: int, layers: int, vocab: int = 1024):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = hidden // HEAD_DIM
    config = Qwen2Config(
        hidden_size=hidden, intermediate_size=round(hidden * QWEN7B_INTERMEDIATE / QWEN7B_HIDDEN),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads * QWEN7B_KV_HEADS // QWEN7B_HEADS),
        vocab_size=vocab, max_position_embeddings=SEQUENCE, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(torch.bfloat16), config


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules="all-linear")
    return get_peft_model(model, config)


def enable_checkpointing(model) -> None:
    """What ``llm.gradient_checkpointing=true`` does: Hugging Face activation checkpointing of every
    decoder layer, non-reentrant."""
    from med3dvlm.models.llm import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)


def forward_memory(run) -> tuple[int, int]:
    """(bytes alive after ``run()``'s forward, peak bytes over forward + backward)."""
    with harness.LiveTensorPeak() as live:
        loss = run()
        after_forward = live.current
        loss.backward()
    return after_forward, live.peak


def decoder_activations(hidden: int, layers: int, sequence: int, checkpointing: bool) -> int:
    """Bytes alive after the forward of a LoRA'd decoder stack (no LM head) on one sequence."""
    model, config = small_qwen(hidden, layers)
    model = with_lora(model)
    if checkpointing:
        enable_checkpointing(model.base_model.model)
    model.train()
    embeds = torch.randn(1, sequence, hidden, dtype=torch.bfloat16, requires_grad=True)
    decoder = model.base_model.model.model

    def run():
        return decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state.float().mean()

    return forward_memory(run)[0]


def lm_head_bytes_per_label_token(hidden: int, tokens: int) -> int:
    """Peak bytes per label token of the LM head on the label positions + fp32 cross-entropy (as
    Med3DVLM.forward does), forward + backward: backward starts here, while every activation is alive."""
    head = nn.Linear(hidden, QWEN7B_VOCAB, bias=False, dtype=torch.bfloat16)
    hidden_states = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, QWEN7B_VOCAB, (tokens,))

    def run():
        return nn.functional.cross_entropy(head(hidden_states).float(), targets)

    after_forward, peak = forward_memory(run)
    return (peak - hidden * QWEN7B_VOCAB * 2) // tokens  # less the weight's gradient (a trainable term)


ENCODER_BATCH = 2  # train-mode BatchNorm needs more than one value per channel at the 1x1x1 grid of s4


def encoder_peak(shape: tuple[int, int, int], bf16: bool, checkpointing: bool) -> int:
    """Peak bytes over forward + backward of DCFormer-small on ENCODER_BATCH volumes, less its
    parameter gradients (counted with the trainable parameters)."""
    from med3dvlm.models.dcformer import DCFormer

    torch.manual_seed(0)
    encoder = DCFormer("small", gradient_checkpointing=checkpointing).train()
    volume = torch.rand(ENCODER_BATCH, 1, *shape)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return sum(out.float().mean() for out in encoder(volume))

    return forward_memory(run)[1] - 4 * DCFORMER_SMALL_PARAMS


def mixer_activations_per_sample(hidden: int) -> tuple[int, int]:
    from med3dvlm.models.projectors import build_projector

    torch.manual_seed(0)
    mixer = build_projector("mixer", low_input_size=(256, 384), high_input_size=(32, 768), output_dim=hidden,
                            low_output_size=(192, 128), high_output_size=(64, 128), depth=2, mlp_depth=2)  # fmt: skip
    low = torch.randn(1, 256, 384, requires_grad=True)
    high = torch.randn(1, 32, 768, requires_grad=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mixer(low, high).float().mean()

    return forward_memory(run)[0], sum(p.numel() for p in mixer.parameters())


@dataclass
class Line:
    item: str
    arithmetic: str
    gb: float


def main(argv: list[str] | None = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    harness.configure(args, default_repeats=1)
    info = harness.machine()
    widths = (128, 256) if args.quick else (256, 512)
    sequence = 64 if args.quick else SEQUENCE
    volumes = ((16, 32, 32), (32, 64, 64)) if args.quick else ((32, 64, 64), (64, 128, 128))
    print("stage-3 memory of the paper's fine-tune on one GPU: measured per component, scaled (show the arithmetic)")
    print(harness.machine_line(info))

    # -- LoRA parameter count: formula, checked on the small model ----------------------------------
    small, config = small_qwen(widths[0], 2)
    peft_lora = sum(p.numel() for n, p in with_lora(small).named_parameters() if "lora_" in n)
    formula_small = lora_parameters(widths[0], config.intermediate_size, config.num_attention_heads,
                                    config.num_key_value_heads, 2, LORA_RANK)  # fmt: skip
    if peft_lora != formula_small:
        raise AssertionError(f"LoRA formula {formula_small} != peft's {peft_lora} on the small model")
    lora_7b = lora_parameters(
        QWEN7B_HIDDEN, QWEN7B_INTERMEDIATE, QWEN7B_HEADS, QWEN7B_KV_HEADS, QWEN7B_LAYERS, LORA_RANK
    )

    # -- LLM activations per token and layer ---------------------------------------------------------
    measured: dict[str, Any] = {"lora_params_small_model": peft_lora}
    per_layer: dict[bool, dict[int, float]] = {False: {}, True: {}}
    for checkpointing in (False, True):
        for width in widths:
            one, two = (decoder_activations(width, depth, sequence, checkpointing) for depth in (1, 2))
            per_layer[checkpointing][width] = (two - one) / sequence
    measured["llm_bytes_per_token_per_layer"] = {
        ("checkpointing" if c else "plain"): {str(w): v for w, v in by_width.items()}
        for c, by_width in per_layer.items()
    }
    scale = QWEN7B_HIDDEN / widths[-1]
    llm_tokens = BATCH * SEQUENCE * QWEN7B_LAYERS

    # -- LM head + loss, encoder, mixer ---------------------------------------------------------------
    head_small = lm_head_bytes_per_label_token(widths[0], 32 if args.quick else 128)
    head_7b = head_small + 2 * (QWEN7B_HIDDEN - widths[0])  # + the larger bf16 input row it saves
    # peak = fixed + per-voxel x voxels x volumes, fitted on two sizes (fixed: e.g. autocast's bf16
    # weight copies, held once per step whatever the batch)
    encoder: dict[str, dict[str, int]] = {}
    fits: dict[str, tuple[float, float]] = {}
    voxels = [shape[0] * shape[1] * shape[2] for shape in volumes]
    for label, bf16, checkpointing in (
        ("fp32", False, False),
        ("bf16", True, False),
        ("bf16 + checkpointing", True, True),
    ):
        peaks = [encoder_peak(shape, bf16, checkpointing) for shape in volumes]
        encoder[label] = {"x".join(map(str, shape)): peak for shape, peak in zip(volumes, peaks)}
        per_voxel = (peaks[1] - peaks[0]) / (ENCODER_BATCH * (voxels[1] - voxels[0]))
        fits[label] = (peaks[0] - per_voxel * ENCODER_BATCH * voxels[0], per_voxel)
    paper_voxels = PAPER_VOLUME[0] * PAPER_VOLUME[1] * PAPER_VOLUME[2]
    mixer_bytes, mixer_params = mixer_activations_per_sample(QWEN7B_HIDDEN if not args.quick else 256)
    measured.update(lm_head_bytes_per_label_token_small=head_small, encoder_peak_bytes=encoder,
                    mixer_bytes_per_sample=mixer_bytes, mixer_params=mixer_params)  # fmt: skip

    # -- the budget --------------------------------------------------------------------------------------
    embeddings = QWEN7B_VOCAB * QWEN7B_HIDDEN
    trainable = lora_7b + DCFORMER_SMALL_PARAMS + MIXER_PARAMS + 2 * embeddings
    fixed = [
        Line("LLM weights, bf16", f"{QWEN7B_PARAMS / 1e9:.1f}e9 x 2 B", QWEN7B_PARAMS * 2 / GB),
        Line(
            "trainable: LoRA + DCFormer + Mixer + embeddings + LM head",
            f"({lora_7b / 1e6:.1f} + {DCFORMER_SMALL_PARAMS / 1e6:.1f} + {MIXER_PARAMS / 1e6:.1f} + 2 x {embeddings / 1e6:.1f})e6"
            f" = {trainable / 1e9:.3f}e9 x {TRAINABLE_BYTES} B (fp32 master, grad, AdamW m, v)",
            trainable * TRAINABLE_BYTES / GB,
        ),
        Line(
            "LM head + fp32 loss on <= 512 label tokens",
            f"{BATCH} x {TEXT_TOKENS} x {head_7b / 1e6:.2f} MB (peak, measured {head_small / 1e6:.2f} MB/token at width "
            f"{widths[0]}, + 2 B x {QWEN7B_HIDDEN - widths[0]})",
            BATCH * TEXT_TOKENS * head_7b / GB,
        ),
        Line(
            "Mixer activations, bf16 autocast",
            f"{BATCH} x {mixer_bytes / 1e6:.1f} MB (measured at full size)",
            BATCH * mixer_bytes / GB,
        ),
        Line("framework margin (assumed)", "CUDA context, workspaces, fragmentation", MARGIN_GB),
    ]
    llm_plain = per_layer[False][widths[-1]] * scale
    llm_ckpt = per_layer[True][widths[-1]] * scale
    variable = {
        "LLM activations, no checkpointing": Line(
            "LLM activations, no checkpointing",
            f"{BATCH} x {SEQUENCE} tokens x {QWEN7B_LAYERS} layers x {llm_plain / 1e3:.1f} kB "
            f"({per_layer[False][widths[-1]] / 1e3:.2f} kB at width {widths[-1]} x {scale:.0f})",
            llm_tokens * llm_plain / GB,
        ),
        "LLM activations, HF gradient checkpointing": Line(
            "LLM activations, HF gradient checkpointing",
            f"{BATCH} x {SEQUENCE} x {QWEN7B_LAYERS} x {llm_ckpt / 1e3:.2f} kB + one layer recomputed "
            f"({BATCH} x {SEQUENCE} x {llm_plain / 1e3:.1f} kB)",
            (llm_tokens * llm_ckpt + BATCH * SEQUENCE * llm_plain) / GB,
        ),
    }
    for label, title in (
        ("fp32", "fp32"),
        ("bf16", "bf16 autocast"),
        ("bf16 + checkpointing", "bf16 + stage checkpointing"),
    ):
        fixed_bytes, per_voxel = fits[label]
        variable[f"DCFormer activations, {label}"] = Line(
            f"DCFormer fwd+bwd peak, {title}",
            f"{fixed_bytes / 1e6:.0f} MB + {BATCH} x {paper_voxels / 1e6:.2f}M voxels x {per_voxel:.1f} B "
            f"(fitted on {' and '.join(encoder[label])})",
            (fixed_bytes + BATCH * paper_voxels * per_voxel) / GB,
        )
    plans = {
        "no checkpointing (bf16 autocast)": ["LLM activations, no checkpointing", "DCFormer activations, bf16"],
        "LLM gradient checkpointing": ["LLM activations, HF gradient checkpointing", "DCFormer activations, bf16"],
        "LLM + DCFormer checkpointing": [
            "LLM activations, HF gradient checkpointing",
            "DCFormer activations, bf16 + checkpointing",
        ],
    }
    print(
        "\nper-component measurements (LLM: bytes alive after the forward pass; DCFormer: peak over forward"
        " + backward, less parameter gradients):"
    )
    for c, label in ((False, "plain"), (True, "HF gradient checkpointing")):
        values = ", ".join(f"{per_layer[c][w] / 1e3:.2f} kB at width {w}" for w in widths)
        print(
            f"  LLM per token per layer, {label}: {values} (x{per_layer[c][widths[-1]] / per_layer[c][widths[0]]:.2f} for x{widths[-1] // widths[0]} width)"
        )
    for label, values in encoder.items():
        shapes = list(values)
        print(f"  DCFormer-small, {ENCODER_BATCH} volumes, {label}: "
              + ", ".join(f"{values[s] / 1e6:.0f} MB at {s}" for s in shapes))  # fmt: skip
    print(f"  Mixer (paper sizes, {mixer_params:,} parameters): {mixer_bytes / 1e6:.1f} MB per sample")
    print(
        f"  LM head + loss, forward + backward peak: {head_small / 1e6:.2f} MB per label token; LoRA formula = peft count ({peft_lora:,}) on the small model"
    )
    rows = [line.__dict__ for line in fixed] + [line.__dict__ for line in variable.values()]
    harness.print_table(f"stage-3 memory terms, batch {BATCH}, {SEQUENCE} tokens ({IMAGE_TOKENS} image + {TEXT_TOKENS} text)",
                        rows, [("item", "item", ""), ("gb", "GB", ".1f"), ("arithmetic", "arithmetic", "")])  # fmt: skip
    fixed_gb = sum(line.gb for line in fixed)
    totals = []
    for plan, keys in plans.items():
        total = fixed_gb + sum(variable[key].gb for key in keys)
        totals.append(
            {"configuration": plan, "total_gb": total, "fits_80gb": "yes" if total <= GPU_MEMORY_GB else "no"}
        )
    harness.print_table(f"totals (fixed terms {fixed_gb:.1f} GB + activations)", totals,
                        [("configuration", "configuration", ""), ("total_gb", "GB", ".1f"), ("fits_80gb", f"<= {GPU_MEMORY_GB:.0f} GB", "")])  # fmt: skip
    results = {
        "measured": measured,
        "terms": rows,
        "totals": totals,
        "lora_params_7b": lora_7b,
        "trainable_params": trainable,
    }
    harness.write_json(args, NAME, results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
