"""The vision-language model: 3D image encoder -> projector -> image tokens inside a causal LLM (SPEC §5).

A prompt holds ``num_image_tokens`` copies of ``<im_patch>`` then the question. The LLM's
embeddings at those positions are replaced by the projector's output, found by token id, so the
splice is right with or without a BOS token, with left or right padding and for any batch.
Any ``AutoModelForCausalLM`` serves as the LLM; LoRA (``peft``) can be added and merged back.

``released_splice=True`` reproduces how the released weights were trained (SPEC §5): the features go
over the N positions after each prompt's first token, whatever token sits there, and VQA prompts
put a space between the placeholders and the question. ``load_released_vlm`` sets it; models trained
here keep the corrected splice.

``Med3DVLM.save_pretrained(dir)`` writes one folder that ``Med3DVLM.from_pretrained(dir)`` reads
back without ``trust_remote_code``: the LLM in standard transformers format (``config.json``,
``model.safetensors``, tokenizer files), the encoder and projector in ``vision.safetensors``, and how
to rebuild them in ``med3dvlm.json``. :func:`save_pretrained_projector` writes the stage-2 projector
alone (``projector.json`` + ``model.safetensors``), which stage 3 loads with ``model.projector_path``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from med3dvlm.models.folders import write_record, write_weights
from med3dvlm.models.llm import (
    IMAGE_TOKEN,
    add_image_token_embeddings,
    embedding_fingerprint,
    load_language_model,
    load_tokenizer,
)
from med3dvlm.models.projectors import build_projector

# SPEC §4: the projector reads the encoder's last two stages (low = s3, high = s4).
VISION_SELECT_LAYER = -2
# SPEC §5: prompt positions are excluded from the loss with the usual ignore index.
IGNORE_INDEX = -100
# SPEC §5: LoRA on every Linear of the LLM except the LM head, r 16, alpha 32, dropout 0.05.
LORA_RANK = 16
LORA_ALPHA = 32
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "all-linear"  # peft: every Linear except the output layer

VLM_CONFIG_FILE = "med3dvlm.json"
VISION_WEIGHTS_FILE = "vision.safetensors"
FORMAT_VERSION = 1
# The stage-2 projector, handed to stage 3 (model.projector_path)
PROJECTOR_CONFIG_FILE = "projector.json"
PROJECTOR_WEIGHTS_FILE = "model.safetensors"


# SPEC §5: the released VQA prompts put a space between the placeholders and the question; its
# caption prompts put none (the released src/dataset/mllm_dataset.py).
RELEASED_VQA_SEPARATOR = " "
CAPTION_TASK = "caption"


def image_prompt(question: str, num_image_tokens: int, separator: str = "") -> str:
    """SPEC §5: the ``<im_patch>`` placeholders, then the question (``separator`` between them)."""
    return IMAGE_TOKEN * num_image_tokens + separator + question


def released_prompt_separator(task: str | None) -> str:
    """What the released code put between the placeholders and the question of ``task`` (SPEC §5):
    nothing for report generation, a space for VQA (any other task, or none given)."""
    return "" if task == CAPTION_TASK else RELEASED_VQA_SEPARATOR


def _check_placeholders(input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor) -> None:
    """Every row must hold exactly N placeholders (one volume per sample)."""
    counts = (input_ids == image_token_id).sum(dim=1)
    expected = features.shape[1]
    wrong = (counts != expected).nonzero().flatten().tolist()
    if features.shape[0] != input_ids.shape[0] or wrong:
        found = {row: int(counts[row]) for row in wrong[:5]}
        raise ValueError(
            f"every prompt needs exactly {expected} {IMAGE_TOKEN} tokens (one volume each) and one volume per "
            f"prompt; got {features.shape[0]} volumes for {input_ids.shape[0]} prompts, placeholder counts by row: "
            f"{found or counts.tolist()} (a prompt truncated by max_length loses its placeholders)"
        )


def splice_image_features(
    embeddings: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """``embeddings`` (B, L, H) with the rows at ``<im_patch>`` positions replaced by ``features`` (B, N, H).

    Every row must hold exactly N placeholders (one volume per sample); they are filled in order.
    """
    _check_placeholders(input_ids, image_token_id, features)
    placeholders = input_ids == image_token_id
    return embeddings.masked_scatter(placeholders.unsqueeze(-1), features.to(embeddings.dtype))


def released_splice_image_features(
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    features: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The released splice (SPEC §5): ``features`` (B, N, H) written over positions 1..N of each
    sequence, counted from its first real token (after any left padding), wherever the placeholders are.

    The released code assumed a BOS token at position 0; Qwen's tokenizer adds none, so position 0
    keeps the first ``<im_patch>`` embedding and the token after the placeholders is overwritten.
    """
    _check_placeholders(input_ids, image_token_id, features)
    batch, length, width = embeddings.shape
    count = features.shape[1]
    if attention_mask is None:
        starts = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        ends = torch.full_like(starts, length)
    else:
        starts = attention_mask.long().argmax(dim=1)  # the first real position (0 with right padding)
        ends = starts + attention_mask.long().sum(dim=1)
    positions = starts[:, None] + 1 + torch.arange(count, device=input_ids.device)
    too_short = (positions[:, -1] >= ends).nonzero().flatten().tolist()
    if too_short:
        raise ValueError(
            f"the released splice writes {count} image features after each prompt's first token, but rows "
            f"{too_short[:5]} hold fewer than {count + 1} tokens from their first real one"
        )
    index = positions.unsqueeze(-1).expand(batch, count, width)
    return embeddings.scatter(1, index, features.to(embeddings.dtype))


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves right padding to the left, as generation needs (new tokens follow the last real one)."""
    if attention_mask[:, -1].all():
        return input_ids, attention_mask
    order = torch.sort(attention_mask.long(), dim=1, stable=True).indices  # padding (0) first
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def encoder_token_shapes(encoder: nn.Module, image_size: Sequence[int]) -> list[tuple[int, int]]:
    """``(tokens, channels)`` of every encoder output for a volume of ``image_size`` (D, H, W)."""
    if hasattr(encoder, "stage_grids") and hasattr(encoder, "stage_channels"):
        grids = encoder.stage_grids(tuple(image_size))
        return [(d * h * w, c) for (d, h, w), c in zip(grids, encoder.stage_channels)]
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        outputs = encoder(torch.zeros(1, 1, *image_size))
    encoder.train(was_training)
    return [tuple(t.shape[1:]) for t in outputs]


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    num_label_tokens: int = 0


class Med3DVLM(nn.Module):
    """Image encoder + projector + causal LLM, with the tokenizer that knows ``<im_patch>``.

    Build one with :func:`build_vlm` (from configs) or :meth:`from_pretrained` (an exported folder).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        projector: nn.Module,
        language_model: nn.Module,
        tokenizer: Any,
        image_size: Sequence[int],
        projector_config: dict[str, Any],
        released_splice: bool = False,
    ) -> None:
        super().__init__()
        # SPEC §5: True runs the released weights as they were trained (see the module docstring)
        self.released_splice = bool(released_splice)
        self.image_encoder = image_encoder
        self.projector = projector
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.image_size = tuple(int(n) for n in image_size)
        self.projector_config = dict(projector_config)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        hidden = language_model.get_input_embeddings().weight.shape[1]
        if projector.output_dim != hidden:
            raise ValueError(f"the projector outputs width {projector.output_dim} but the LLM's width is {hidden}")

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.language_model, PeftModel)

    def base_language_model(self) -> nn.Module:
        """The transformers model itself (inside the peft wrapper when LoRA is on)."""
        return self.language_model.get_base_model() if self.has_lora else self.language_model

    # -- the splice ----------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Volumes ``(B, 1, D, H, W)`` -> image tokens ``(B, num_image_tokens, LLM width)``."""
        stages = self.image_encoder(images)
        low = stages[VISION_SELECT_LAYER] if len(stages) >= -VISION_SELECT_LAYER else stages[-1]
        return self.projector(low, stages[-1])

    def embed_inputs(
        self, input_ids: torch.Tensor, images: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The LLM's input embeddings with the image features spliced in (``attention_mask`` tells the
        released splice where left-padded prompts start)."""
        embeddings = self.base_language_model().get_input_embeddings()(input_ids)
        if images is None:
            if (input_ids == self.image_token_id).any():
                raise ValueError(f"the prompts hold {IMAGE_TOKEN} placeholders but no volumes were given")
            return embeddings
        features = self.encode_images(images)
        if self.released_splice:
            return released_splice_image_features(embeddings, input_ids, self.image_token_id, features, attention_mask)
        return splice_image_features(embeddings, input_ids, self.image_token_id, features)

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> VLMOutput:
        """Without ``labels``: the LLM's logits at every position. With ``labels``: the mean
        next-token cross-entropy over labelled positions (``IGNORE_INDEX`` elsewhere).

        The loss applies the LM head to the labelled positions only: with a 150k-token vocabulary
        the logits of every prompt position would cost more than the rest of the model.
        """
        embeddings = self.embed_inputs(input_ids, images, attention_mask)
        if labels is None:
            logits = self.language_model(
                inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False
            ).logits
            return VLMOutput(loss=None, logits=logits)
        base = self.base_language_model()
        hidden = base.get_decoder()(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[selected])
        count = int(selected.sum())
        if count == 0:  # a batch whose answers were all truncated away
            return VLMOutput(loss=logits.sum() * 0.0, logits=None, num_label_tokens=0)
        loss = F.cross_entropy(logits.float(), targets[selected])
        return VLMOutput(loss=loss, logits=None, num_label_tokens=count)

    # -- generation ----------------------------------------------------------------------------
    def prompt_text(self, question: str, task: str | None = None) -> str:
        """The prompt for ``question``: placeholders, then the question; with ``released_splice`` the
        released form (a space before a VQA question, none before a caption prompt, SPEC §5)."""
        separator = released_prompt_separator(task) if self.released_splice else ""
        return image_prompt(question, self.num_image_tokens, separator)

    def tokenize_prompts(
        self, questions: Sequence[str], tasks: Sequence[str | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask for ``questions`` (placeholders added here); ``tasks``
        (``caption``, ``vqa_closed``, ...; default VQA) matters to a ``released_splice`` model only."""
        tasks = list(tasks) if tasks is not None else [None] * len(questions)
        if len(tasks) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(tasks)} tasks")
        tokens = [self.tokenizer(self.prompt_text(q, t))["input_ids"] for q, t in zip(questions, tasks)]
        return pad_sequences(tokens, self.tokenizer.pad_token_id, side="left")

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        **generate_options: Any,
    ) -> torch.Tensor:
        """New token ids ``(B, T)`` for a batch of prompts (greedy by default, with KV cache).

        Right-padded prompts are moved to left padding first; finished rows are padded.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = left_align(input_ids, attention_mask)
        embeddings = self.embed_inputs(input_ids, images, attention_mask)
        options: dict[str, Any] = {"do_sample": do_sample}
        if not do_sample:  # no sampling knobs the checkpoint's generation config may carry
            options.update(temperature=None, top_p=None, top_k=None)
        options.update(generate_options)
        return self.language_model.generate(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **options,
        )

    def answer(
        self,
        images: torch.Tensor,
        questions: Sequence[str],
        tasks: Sequence[str | None] | None = None,
        **generate_options: Any,
    ) -> list[str]:
        """Answers as text: one volume ``(1, D, H, W)`` per question, stacked to ``(B, 1, D, H, W)``;
        ``tasks`` as in :meth:`tokenize_prompts`."""
        input_ids, attention_mask = self.tokenize_prompts(questions, tasks)
        device = next(self.parameters()).device
        new_tokens = self.generate(
            images.to(device), input_ids.to(device), attention_mask.to(device), **generate_options
        )
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    # -- LoRA ----------------------------------------------------------------------------------
    def add_lora(
        self,
        r: int = LORA_RANK,
        alpha: int = LORA_ALPHA,
        dropout: float = LORA_DROPOUT,
        target_modules: str | Sequence[str] = LORA_TARGET_MODULES,
    ) -> None:
        """Wraps the LLM with LoRA adapters (SPEC §5). peft freezes the LLM's own weights."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise RuntimeError("LoRA is already on this model")
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
        self.language_model = get_peft_model(self.language_model, config)

    def merge_lora(self) -> None:
        """Folds the LoRA updates into the base weights and drops the adapters (SPEC §1, stage 3)."""
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()

    # -- export --------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        encoder_config = getattr(self.image_encoder, "build_config", None)
        if encoder_config is None:
            raise ValueError("the image encoder was not made by build_encoder, so it cannot be exported")
        return {
            "format": "med3dvlm",
            "format_version": FORMAT_VERSION,
            "image_size": list(self.image_size),
            "image_token": IMAGE_TOKEN,
            "image_encoder": {k: v for k, v in encoder_config.items() if k != "pretrained"},
            "projector": self.projector_config,
            "released_splice": self.released_splice,
        }

    def save_pretrained(self, output_dir: str | os.PathLike) -> Path:
        """Writes the whole model to ``output_dir`` (LoRA merged first)."""
        self.merge_lora()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.language_model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        vision = {f"image_encoder.{k}": v for k, v in self.image_encoder.state_dict().items()}
        vision.update({f"projector.{k}": v for k, v in self.projector.state_dict().items()})
        write_weights(output_dir / VISION_WEIGHTS_FILE, vision)
        write_record(output_dir / VLM_CONFIG_FILE, self.config_dict())
        return output_dir

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Med3DVLM:
        """Loads a folder written by :meth:`save_pretrained` (standard transformers classes only),
        in eval mode; ``dtype`` (e.g. ``"bfloat16"``) casts the whole model."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from med3dvlm.models.encoders import build_encoder

        path = Path(path)
        config_file = path / VLM_CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: {path} is not a folder written by Med3DVLM.save_pretrained"
            )
        config = json.loads(config_file.read_text())
        if config.get("format") != "med3dvlm" or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_file}: unsupported format {config.get('format')!r} v{config.get('format_version')}"
            )
        encoder_config = dict(config["image_encoder"])
        image_encoder = build_encoder(encoder_config.pop("name"), **encoder_config)
        projector = build_projector(**config["projector"])
        language_model = AutoModelForCausalLM.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        vision = load_file(str(path / VISION_WEIGHTS_FILE))
        for prefix, module in (("image_encoder.", image_encoder), ("projector.", projector)):
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in vision.items() if k.startswith(prefix)}, strict=True
            )
        released_splice = config.get("released_splice", False)  # absent in folders written before it existed
        if not isinstance(released_splice, bool):
            raise ValueError(f"{config_file}: released_splice must be true or false, got {released_splice!r}")
        model = cls(
            image_encoder,
            projector,
            language_model,
            tokenizer,
            config["image_size"],
            config["projector"],
            released_splice=released_splice,
        )
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``(ids, attention_mask)`` padded to the longest on ``side``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(length - len(sequence), length)
        ids[row, span] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


# -- the projector's hand-off (stage 2 -> 3) -----------------------------------------------------
def save_pretrained_projector(model: Med3DVLM, output_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """``projector.json`` (its config and the LLM it was trained against) + ``model.safetensors``."""
    output_dir = Path(output_dir)
    state = state_dict if state_dict is not None else model.projector.state_dict()
    write_weights(output_dir / PROJECTOR_WEIGHTS_FILE, state)
    record = {"projector": model.projector_config, "language_model": embedding_fingerprint(model.base_language_model())}
    write_record(output_dir / PROJECTOR_CONFIG_FILE, record)
    return output_dir


def load_pretrained_projector(model: Med3DVLM, path: str | os.PathLike) -> None:
    """Loads a stage-2 projector into ``model``; refuses one built or trained for another setup."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / PROJECTOR_CONFIG_FILE, path / PROJECTOR_WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.exists():
            raise FileNotFoundError(
                f"{file} not found: model.projector_path must be the projector/ folder of a pretrain run"
            )
    record = json.loads(config_file.read_text())
    for key, value in record["projector"].items():
        if model.projector_config.get(key) != value:
            raise ValueError(
                f"{path}: the saved projector has {key}={value!r} but this model's is "
                f"{model.projector_config.get(key)!r}; use the projector, encoder, data shape and llm of the pretrain run"
            )
    saved, current = record["language_model"], embedding_fingerprint(model.base_language_model())
    same_llm = saved["embedding_shape"] == current["embedding_shape"] and math.isclose(
        saved["embedding_sum"], current["embedding_sum"], rel_tol=1e-6, abs_tol=1e-6
    )
    if not same_llm:
        raise ValueError(
            f"{path}: this projector was pretrained against another LLM (embedding fingerprint {saved} vs {current}); "
            "use the llm config of the pretrain run"
        )
    model.projector.load_state_dict(load_file(str(weights_file)), strict=True)


def build_vlm(
    image_encoder: nn.Module,
    projector: dict[str, Any],
    llm: dict[str, Any],
    image_size: Sequence[int],
) -> Med3DVLM:
    """The VLM from configs: ``projector`` = the projector group (``name`` + options, whose input
    sizes are derived here from the encoder's stage grids at ``image_size``), ``llm`` = the llm group.

    ``projector.num_image_tokens``, when given, must equal the built projector's token count: the
    data collator uses it to write the placeholders.
    """
    tokenizer = load_tokenizer(**llm)
    vocab = {"vocab_size": len(tokenizer)} if llm.get("config") is not None else {}
    language_model = load_language_model(**llm, **vocab)
    add_image_token_embeddings(language_model, tokenizer)
    shapes = encoder_token_shapes(image_encoder, image_size)
    options = {k: v for k, v in dict(projector).items() if k != "num_image_tokens"}
    projector_config = {
        **options,
        "low_input_size": list(shapes[VISION_SELECT_LAYER] if len(shapes) >= 2 else shapes[-1]),
        "high_input_size": list(shapes[-1]),
        "output_dim": int(language_model.get_input_embeddings().weight.shape[1]),
    }
    projector_module = build_projector(**projector_config)
    expected = projector.get("num_image_tokens")
    if expected is not None and expected != projector_module.num_tokens:
        raise ValueError(
            f"projector.num_image_tokens={expected} but the {projector['name']} projector with these sizes emits "
            f"{projector_module.num_tokens} image tokens at image size {list(image_size)}; "
            f"set projector.num_image_tokens={projector_module.num_tokens}"
        )
    return Med3DVLM(image_encoder, projector_module, language_model, tokenizer, image_size, projector_config)
