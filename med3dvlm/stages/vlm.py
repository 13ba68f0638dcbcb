"""Stages 2 and 3: projector pretraining and LoRA fine-tuning of the VLM (SPEC §5).

One LightningModule, :class:`VLMStage`, with ``stage="pretrain"`` (only the projector trains) or
``stage="finetune"`` (LoRA on the LLM; encoder, projector, token embeddings and LM head fully
trainable). Hand-offs between stages are folders named by config paths:

* stage 1 -> 2: ``encoder.pretrained=<siglip run>/image_encoder`` (the encoder export);
* stage 2 -> 3: ``model.projector_path=<pretrain run>/projector`` (written by
  :class:`~med3dvlm.checkpoints.handoff.ExportHandOff` with ``part=projector``),
  plus ``encoder.pretrained=<pretrain run>/image_encoder`` (unchanged by stage 2, exported again);
* stage 3 -> users: ``python -m med3dvlm.export ckpt_path=<finetune run>/checkpoints/last.ckpt out_dir=<dir>``.

Testing generates answers to the closed questions of the test split greedily and scores them with
the paper's rule (SPEC §7), per question type and overall.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn

from med3dvlm.metrics.vqa import closed_answer_is_correct, closed_vqa_accuracy, format_closed_vqa_table
from med3dvlm.models.llm import load_tokenizer
from med3dvlm.models.vlm import (
    IGNORE_INDEX,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_RANK,
    LORA_TARGET_MODULES,
    Med3DVLM,
    image_prompt,
    load_pretrained_projector,
    pad_sequences,
)

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
# SPEC §5: training text is at most 512 tokens.
MAX_TEXT_TOKENS = 512
# SPEC §5 recipes: 3 % linear warm-up, then cosine decay.
WARMUP_RATIO = 0.03


# ------------------------------------------------------------------------------------------------
# Tokenisation hook of the DataModules
# ------------------------------------------------------------------------------------------------
class VLMCollator:
    """Stacks volumes and writes each sample as ``prompt + " " + answer + EOS`` (SPEC §5).

    The prompt is ``num_image_tokens`` copies of ``<im_patch>`` then the question; its positions are
    labelled ``-100``; the text is cut at ``max_length`` tokens. The batch also carries the prompts
    alone, left-padded, for generation. Picklable: the tokenizer is loaded on first use.
    """

    def __init__(self, llm: dict[str, Any], num_image_tokens: int, max_length: int = MAX_TEXT_TOKENS) -> None:
        self.llm = dict(llm)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(**self.llm)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def encode(self, prompt: str, answer: str, source: str) -> tuple[list[int], list[int], list[int]]:
        """``(input_ids, labels, prompt_ids)`` of one sample."""
        tokenizer = self.tokenizer
        prompt_text = image_prompt(prompt, self.num_image_tokens)
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        full_ids = tokenizer(f"{prompt_text} {answer}")["input_ids"] + [tokenizer.eos_token_id]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{source}: the tokenizer merges the prompt's last token with the answer; cannot label it")
        if len(prompt_ids) >= self.max_length:
            raise ValueError(
                f"{source}: the prompt takes {len(prompt_ids)} tokens ({self.num_image_tokens} image tokens), "
                f"max_length is {self.max_length}: no room for the answer"
            )
        input_ids = full_ids[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :])[: self.max_length]
        return input_ids, labels, prompt_ids

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [item for item in items if item is not None]  # skipped bad samples (on_bad_sample=skip)
        if not items:
            return None
        encoded = [self.encode(item["prompt"], item["answer"], item["source"]) for item in items]
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = pad_sequences([e[0] for e in encoded], pad, side="right")
        labels, _ = pad_sequences([e[1] for e in encoded], IGNORE_INDEX, side="right")
        prompt_ids, prompt_mask = pad_sequences([e[2] for e in encoded], pad, side="left")
        batch = {
            "image": torch.stack([torch.as_tensor(item["image"]) for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
        }
        for key in ("prompt", "answer", "task", "question_type", "answer_choice", "source"):
            batch[key] = [item.get(key) for item in items]
        return batch


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
def configure_trainable(model: Med3DVLM, stage: str) -> None:
    """SPEC §5: stage 2 trains the projector only; stage 3 trains the LoRA adapters, the encoder,
    the projector, the token embeddings and the LM head."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if stage == "finetune":
        if not model.has_lora:
            raise RuntimeError("fine-tuning expects LoRA on the LLM (Med3DVLM.add_lora)")
        for name, parameter in model.language_model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)
        model.image_encoder.requires_grad_(True)
        base = model.base_language_model()
        base.get_input_embeddings().requires_grad_(True)
        base.get_output_embeddings().requires_grad_(True)


# when no optimizer is configured (the configs give the paper's: configs/experiment/*_paper.yaml)
DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0)


class VLMStage(L.LightningModule):
    """Trains :class:`Med3DVLM` as stage 2 (``pretrain``) or stage 3 (``finetune``), see module doc.

    ``projector_path``: a stage-2 projector export, loaded here. ``encoder_path``: where the
    encoder's weights came from (``encoder.pretrained``), recorded for the stage-2 check that the
    frozen encoder is a trained one. ``lora``: keyword arguments of :meth:`Med3DVLM.add_lora` (stage 3). ``generation``: keyword
    arguments of :meth:`Med3DVLM.generate` for the closed questions at test time.
    ``flush_denormal``: on CPUs, flush denormal floats to zero while training; the tails of a
    150k-way softmax underflow to denormals, which slow the LM-head matmuls more than tenfold.
    ``freeze_encoder_batchnorm``: keep the trainable encoder's BatchNorm layers in eval mode (their
    stage-1 running statistics; the affine weights still train). In train mode BatchNorm normalises
    over the batch of each process: with a few small volumes its last stages see a handful of values
    per channel (DCFormer-nano on 32x64x64 phantoms: 1 token per volume at s4), which rewrites the
    image features stage 2 taught the projector to read.
    ``embedding_lr``: learning rate of the token embeddings and the LM head (stage 3), null = the
    optimizer's. Every row of the LM head gets a gradient at every step (the softmax reaches all of
    them), so at a LoRA-sized learning rate AdamW moves the whole pretrained vocabulary (and, with
    tied weights, every input embedding) by about that much per step.
    ``vision_lr``: learning rate of the image encoder and the projector in stage 3, null = the
    optimizer's. AdamW moves every one of their weights by about the lr per step: at a LoRA-sized lr
    the image features that stage 2 taught the LLM to read are rewritten before LoRA learns to use them.
    """

    def __init__(
        self,
        model: Med3DVLM,
        stage: str = "pretrain",
        optimizer: Callable[..., torch.optim.Optimizer] = DEFAULT_OPTIMIZER,
        warmup_ratio: float = WARMUP_RATIO,
        projector_path: str | None = None,
        encoder_path: str | None = None,
        lora: dict[str, Any] | None = None,
        generation: dict[str, Any] | None = None,
        flush_denormal: bool = True,
        embedding_lr: float | None = None,
        freeze_encoder_batchnorm: bool = False,
        vision_lr: float | None = None,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.model = model
        self.stage = stage
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.projector_path = projector_path
        self.encoder_path = encoder_path
        self.generation = dict(generation or {"max_new_tokens": 8})
        self.flush_denormal = flush_denormal
        self.embedding_lr = embedding_lr
        self.freeze_encoder_batchnorm = freeze_encoder_batchnorm
        self.vision_lr = vision_lr
        if projector_path:
            load_pretrained_projector(model, projector_path)
        if stage == "finetune":
            options = {
                "r": LORA_RANK,
                "alpha": LORA_ALPHA,
                "dropout": LORA_DROPOUT,
                "target_modules": LORA_TARGET_MODULES,
            }
            model.add_lora(**{**options, **(lora or {})})
        configure_trainable(model, stage)
        self._closed_records: list[dict[str, Any]] = []
        self._denormal_before: bool | None = None
        self.test_results: dict[str, Any] | None = None

    def train(self, mode: bool = True) -> VLMStage:
        """Frozen parts stay in eval mode: BatchNorm statistics and dropout belong to the loaded model."""
        super().train(mode)
        if mode and self.stage == "pretrain":
            self.model.image_encoder.eval()
            self.model.language_model.eval()
        if mode and self.freeze_encoder_batchnorm:
            for module in self.model.image_encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def setup(self, stage: str) -> None:
        if self.flush_denormal and self._denormal_before is None:
            self._denormal_before = torch.set_flush_denormal(True)  # returns whether the CPU supports it

    def teardown(self, stage: str) -> None:
        if self._denormal_before:
            torch.set_flush_denormal(False)
        self._denormal_before = None

    def on_fit_start(self) -> None:
        # transformers hands models over in eval mode and Lightning keeps the modes it finds: without
        # this, stage 3 would train with LoRA dropout off and the encoder's BatchNorm frozen
        self.train()
        if self.stage == "finetune" and not self.projector_path:
            logger.warning("stage 3 without model.projector_path: the projector starts untrained (no stage-2 hand-off)")
        if self.stage == "pretrain" and not self.encoder_path:
            logger.warning(
                "stage 2 with a randomly initialised, frozen image encoder (no stage-1 hand-off): "
                "pass encoder.pretrained=<siglip run>/image_encoder"
            )

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        output = self.model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        return output.loss

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["task"]))
        return loss

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        # sync_dist: under data parallelism every process must pick the same best checkpoint
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=len(batch["task"]), sync_dist=True)

    # -- test: loss, and the closed questions answered and scored --------------------------------
    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return
        self.log("test/loss", self._loss(batch), batch_size=len(batch["task"]), sync_dist=True)
        closed = [i for i, task in enumerate(batch["task"]) if task == "vqa_closed"]
        if not closed:
            return
        index = torch.tensor(closed, device=batch["image"].device)
        new_tokens = self.model.generate(
            batch["image"].index_select(0, index),
            batch["prompt_ids"].index_select(0, index),
            batch["prompt_attention_mask"].index_select(0, index),
            **self.generation,
        )
        predictions = self.model.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, prediction in zip(closed, predictions):
            letter = batch["answer_choice"][i]
            self._closed_records.append(
                {
                    "source": batch["source"][i],
                    "question_type": batch["question_type"][i],
                    "answer": batch["answer"][i],
                    "prediction": prediction,
                    "correct": closed_answer_is_correct(prediction, letter),
                }
            )

    def on_test_epoch_end(self) -> None:
        records, self._closed_records = self._closed_records, []
        if self.trainer is not None and self.trainer.world_size > 1:
            gathered: list[list[dict[str, Any]]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        self.test_results = closed_vqa_accuracy(records)
        for name, row in self.test_results["accuracy"].items():
            self.log(f"test/closed_vqa_accuracy/{name}", row["accuracy"], sync_dist=True)  # equal on every process

    def test_report(self) -> dict[str, Any]:
        results = self.test_results or closed_vqa_accuracy([])
        return {"file": "vqa_closed.json", "results": results, "table": format_closed_vqa_table(results)}

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        from med3dvlm.stages.schedules import warmup_cosine_schedule

        optimizer = self.optimizer_factory(self.parameter_groups())
        scheduler = warmup_cosine_schedule(
            optimizer, self.warmup_ratio, lambda: self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters: the token embeddings and LM head in a group of their own when
        ``embedding_lr`` is set (a tied matrix appears once), the image encoder and projector in one
        when ``vision_lr`` is set (stage 3 only; in stage 2 the projector trains at the optimizer's lr)."""
        base = self.model.base_language_model()
        embedding_ids = {id(base.get_input_embeddings().weight), id(base.get_output_embeddings().weight)}
        vision_ids = set()
        if self.vision_lr is not None and self.stage == "finetune":
            vision = list(self.model.image_encoder.parameters()) + list(self.model.projector.parameters())
            vision_ids = {id(parameter) for parameter in vision}
        embeddings, vision, rest = [], [], []
        for parameter in self.model.parameters():  # parameters() yields a shared tensor once
            if not parameter.requires_grad:
                continue
            if self.embedding_lr is not None and id(parameter) in embedding_ids:
                embeddings.append(parameter)
            elif id(parameter) in vision_ids:
                vision.append(parameter)
            else:
                rest.append(parameter)
        groups = [{"params": rest}]
        if embeddings:
            groups.append({"params": embeddings, "lr": self.embedding_lr})
        if vision:
            groups.append({"params": vision, "lr": self.vision_lr})
        return groups
