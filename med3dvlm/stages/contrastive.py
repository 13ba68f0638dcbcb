"""Stage 1: SigLIP (or CLIP) alignment of the 3D image encoder with a text encoder (SPEC §3)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn

from med3dvlm.metrics.retrieval import format_retrieval_table, retrieval_protocol, retrieval_recalls
from med3dvlm.models.contrastive import ContrastiveModel

# SPEC §3: reports are cut to 512 text tokens.
MAX_REPORT_TOKENS = 512
# SPEC §3, released recipe: 3 % linear warm-up, then cosine decay.
WARMUP_RATIO = 0.03

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def fit_report_to_budget(
    text: str, count_tokens: Callable[[str], int], max_tokens: int, rng: random.Random | None = None
) -> str:
    """SPEC §3: a report over the budget keeps its first sentence, then random other sentences while
    they fit. Without ``rng`` (evaluation) the other sentences are taken in order. Chosen sentences
    keep their original order so the text still reads as a report."""
    if count_tokens(text) <= max_tokens:
        return text
    sentences = split_sentences(text)
    if len(sentences) <= 1:
        return text  # one very long sentence: the tokenizer's truncation cuts it
    order = list(range(1, len(sentences)))
    if rng is not None:
        rng.shuffle(order)
    kept = [0]
    for index in order:
        candidate = " ".join(sentences[i] for i in sorted(kept + [index]))
        if count_tokens(candidate) > max_tokens:
            break
        kept.append(index)
    return " ".join(sentences[i] for i in sorted(kept))


class ContrastiveCollator:
    """Stacks volumes and tokenises the reports (the stage's tokenisation hook into the DataModules).

    ``train=True`` samples which sentences of an over-long report to keep; the random stream is
    seeded, so a resumed run draws the same sentences.
    """

    def __init__(self, tokenizer_path: str, max_length: int = MAX_REPORT_TOKENS, train: bool = True, seed: int = 0):
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.train = train
        self.seed = seed
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from med3dvlm.models.text_encoder import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [item for item in items if item is not None]  # skipped bad samples (on_bad_sample=skip)
        if not items:
            return None
        texts = []
        for item in items:
            rng = random.Random(f"{self.seed}:{item['source']}:{item.get('epoch', 0)}") if self.train else None
            texts.append(fit_report_to_budget(item["answer"], self._count_tokens, self.max_length, rng))
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "image": torch.stack([torch.as_tensor(item["image"]) for item in items]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "text": texts,
            "source": [item["source"] for item in items],
        }


# when no optimizer is configured (the configs give the paper's: configs/experiment/*_paper.yaml)
DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.1)


class ContrastiveModule(L.LightningModule):
    """Trains :class:`ContrastiveModel` with a contrastive loss; validates and tests by retrieval."""

    def __init__(
        self,
        model: ContrastiveModel,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] = DEFAULT_OPTIMIZER,
        warmup_ratio: float = WARMUP_RATIO,
        loss_monitor: Any | None = None,
        retrieval_sizes: tuple[int, ...] = (100, 500, 1000, 2000),
        retrieval_ks: tuple[int, ...] = (1, 5, 10),
        loss_lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.loss_monitor = loss_monitor
        self.retrieval_sizes = tuple(retrieval_sizes)
        self.retrieval_ks = tuple(retrieval_ks)
        self.loss_lr_multiplier = loss_lr_multiplier
        self._embeddings: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
        self.test_results: dict | None = None

    def embed_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.model.encode_image(batch["image"])
        text = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        return image, text

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        image, text = self.embed_batch(batch)
        loss = self.loss(image, text)
        if self.loss_monitor is not None:
            self.loss_monitor.check(loss, self.global_step, image=image, text=text)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        for name in ("logit_scale", "logit_bias"):
            value = getattr(self.loss, name, None)
            if isinstance(value, torch.Tensor):
                self.log(f"train/{name}", value.detach(), batch_size=image.shape[0])
        return loss

    # -- evaluation: collect all embeddings, score retrieval on the whole split --------------------
    def _collect(self, batch: dict[str, Any] | None) -> None:
        if batch is None:
            return
        image, text = self.embed_batch(batch)
        self._embeddings["image"].append(image.float())
        self._embeddings["text"].append(text.float())

    def _gathered_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.cat(self._embeddings["image"]) if self._embeddings["image"] else torch.empty(0)
        text = torch.cat(self._embeddings["text"]) if self._embeddings["text"] else torch.empty(0)
        self._embeddings = {"image": [], "text": []}
        if self.trainer is not None and self.trainer.world_size > 1:
            # Under DDP every rank scores the union; the distributed sampler pads, so drop duplicates
            # is not attempted: use `limit`-free, evenly divisible eval sets for exact protocol numbers.
            image = self.all_gather(image).flatten(0, 1)
            text = self.all_gather(text).flatten(0, 1)
        return image, text

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        image, text = self._gathered_embeddings()
        if image.shape[0] < 2:
            return
        metrics = retrieval_recalls(image, text, ks=self.retrieval_ks)
        loss = self.loss(image, text) if self.trainer.world_size == 1 else None
        for key, value in metrics.items():
            self.log(f"val/{key}", float(value), sync_dist=False)
        if loss is not None:
            self.log("val/loss", loss, sync_dist=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        image, text = self._gathered_embeddings()
        self.test_results = retrieval_protocol(image, text, sizes=self.retrieval_sizes, ks=self.retrieval_ks)
        for size, metrics in self.test_results.items():
            for key, value in metrics.items():
                self.log(f"test/N{size}/{key}", float(value), sync_dist=False)

    def test_report(self) -> dict[str, Any]:
        """What the entry points write and print after testing: retrieval JSON + markdown table."""
        results = self.test_results or {}
        return {"file": "retrieval.json", "results": results, "table": format_retrieval_table(results)}

    def configure_optimizers(self):
        from med3dvlm.stages.schedules import warmup_cosine_schedule

        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                # Weight decay on matrices and kernels only; biases and norms are exempt.
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        loss_parameters = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_parameters:
            # The loss's temperature and bias: no decay; optionally a faster learning rate, which
            # short runs need for the temperature to move away from its initial value.
            optimizer = self.optimizer_factory(groups)
            base_lr = optimizer.defaults["lr"]
            optimizer.add_param_group(
                {"params": loss_parameters, "weight_decay": 0.0, "lr": base_lr * self.loss_lr_multiplier}
            )
        else:
            optimizer = self.optimizer_factory(groups)
        scheduler = warmup_cosine_schedule(
            optimizer, self.warmup_ratio, lambda: self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
