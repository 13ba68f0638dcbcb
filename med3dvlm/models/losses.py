"""Contrastive image-text losses for stage 1 (SPEC §3) and a guard that stops a diverging run.

Both losses take L2-normalised features ``(n_local, d)`` in which row ``i`` of the images and row
``i`` of the texts are a matching pair, own their learnable temperature (and bias), and work the
same on one process or many. Under ``torch.distributed`` every rank returns the loss of the
*global* batch; the gradient convention that makes DDP training equal single-process training on
the concatenated batch is described in :mod:`med3dvlm.models.distributed`.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from med3dvlm.models import distributed as dist_utils

# SigLIP paper (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023, §3.2 and
# Algorithm 1), also the Med3DVLM paper's stated init (SPEC §3): t' = log 10, b = -10.
SIGLIP_PAPER_LOGIT_SCALE = math.log(10.0)
SIGLIP_PAPER_LOGIT_BIAS = -10.0
# Released Med3DVLM training code (SPEC §3): t' = log(1 / 0.07), b = 0, logits averaged with their
# transpose.
SIGLIP_RELEASED_LOGIT_SCALE = math.log(1.0 / 0.07)
SIGLIP_RELEASED_LOGIT_BIAS = 0.0
SIGLIP_RELEASED_SYMMETRIC_LOGITS = True

# CLIP paper (Radford et al., "Learning Transferable Visual Models From Natural Language
# Supervision", ICML 2021, §2.5): temperature initialised to 0.07 and clipped so that logits are
# scaled by at most 100.
CLIP_INIT_LOGIT_SCALE = math.log(1.0 / 0.07)
CLIP_MAX_LOGIT_SCALE = 100.0


def _check_pairs(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "Contrastive losses expect image and text features of the same shape (batch, width) "
            f"with row i of each forming a pair; got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}."
        )


def _sigmoid_block_sum(
    image_rows: Tensor,
    text_cols: Tensor,
    text_rows: Tensor | None,
    image_cols: Tensor | None,
    scale: Tensor,
    bias: Tensor,
    positive_offset: int | None,
) -> Tensor:
    """``-sum log sigmoid(z * L)`` over one block of the logit matrix.

    Rows are images, columns texts. With ``text_rows``/``image_cols`` given the logits are the
    symmetric ``(L + L^T) / 2``. Positives lie on ``diagonal(positive_offset)`` (None: none).
    """
    similarity = image_rows @ text_cols.T
    if text_rows is not None and image_cols is not None:
        similarity = 0.5 * (similarity + text_rows @ image_cols.T)
    logits = scale * similarity + bias
    labels = torch.full_like(logits, -1.0)
    if positive_offset is not None:
        labels.diagonal(positive_offset).fill_(1.0)
    return -F.logsigmoid(labels * logits).sum()


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., ICCV 2023), the Med3DVLM stage-1 loss.

    ``L = exp(t') * x_img @ x_txt^T + b`` over the global batch of N pairs, labels ``z = +1`` on
    matching pairs and ``-1`` elsewhere, ``loss = -(1/N) sum_ij log sigmoid(z_ij L_ij)``.

    ``gather=True`` all-gathers features (with gradients) across ranks and computes the N x N
    loss on every rank. ``chunked=True`` is the paper's memory-light variant (§3.3): each rank
    keeps its images while the texts travel around a ring, so a rank only ever forms
    ``n_local x chunk_size`` blocks; on one process it walks the text batch in chunks. Blocks
    are recomputed in the backward pass (activation checkpointing), so the chunked loss really
    holds only one block at a time. Both modes give the same loss and gradients.
    """

    def __init__(
        self,
        init_logit_scale: float = SIGLIP_PAPER_LOGIT_SCALE,
        init_logit_bias: float = SIGLIP_PAPER_LOGIT_BIAS,
        symmetric_logits: bool = False,
        gather: bool = True,
        chunked: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of texts, got {chunk_size}.")
        # t' of the paper; the logits are scaled by exp(t').
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.symmetric_logits = symmetric_logits
        self.gather = gather
        self.chunked = chunked
        self.chunk_size = chunk_size

    @classmethod
    def from_preset(cls, preset: Literal["paper", "released"], **overrides) -> SigLipLoss:
        """``"paper"``: t' = log 10, b = -10. ``"released"``: the released training code's
        t' = log(1/0.07), b = 0 with symmetric logits. Keyword arguments override either."""
        presets = {
            "paper": dict(
                init_logit_scale=SIGLIP_PAPER_LOGIT_SCALE,
                init_logit_bias=SIGLIP_PAPER_LOGIT_BIAS,
                symmetric_logits=False,
            ),
            "released": dict(
                init_logit_scale=SIGLIP_RELEASED_LOGIT_SCALE,
                init_logit_bias=SIGLIP_RELEASED_LOGIT_BIAS,
                symmetric_logits=SIGLIP_RELEASED_SYMMETRIC_LOGITS,
            ),
        }
        if preset not in presets:
            raise ValueError(f"Unknown SigLIP preset {preset!r}; choose one of {sorted(presets)}.")
        return cls(**{**presets[preset], **overrides})

    def extra_repr(self) -> str:
        return (
            f"symmetric_logits={self.symmetric_logits}, gather={self.gather}, "
            f"chunked={self.chunked}, chunk_size={self.chunk_size}"
        )

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        _check_pairs(image_features, text_features)
        dtype = torch.promote_types(image_features.dtype, self.logit_scale.dtype)
        images, texts = image_features.to(dtype), text_features.to(dtype)
        scale, bias = self.logit_scale.to(dtype).exp(), self.logit_bias.to(dtype)
        distributed = self.gather and dist_utils.is_distributed()
        if self.chunked and distributed:
            return self._ring_loss(images, texts, scale, bias)
        if distributed:
            sizes = dist_utils.gather_sizes(images.shape[0], images.device)
            images = dist_utils.all_gather_with_grad(images, sizes)
            texts = dist_utils.all_gather_with_grad(texts, sizes)
        if self.chunked:
            total = self._chunked_sum(images, texts, images, texts, scale, bias, True)
            return total / images.shape[0]
        symmetric = (texts, images) if self.symmetric_logits else (None, None)
        return _sigmoid_block_sum(images, texts, *symmetric, scale, bias, 0) / images.shape[0]

    def _chunked_sum(
        self,
        images: Tensor,
        texts: Tensor,
        other_images: Tensor,
        other_texts: Tensor,
        scale: Tensor,
        bias: Tensor,
        same_batch: bool,
    ) -> Tensor:
        """Loss sum of local images against another batch of texts, ``chunk_size`` texts at a
        time, each block recomputed in backward so only one block is alive at once.
        ``same_batch``: the other batch is the images' own, so it holds their partners."""
        width = self.chunk_size or other_texts.shape[0]
        total = images.new_zeros(())
        for start in range(0, other_texts.shape[0], width):
            stop = start + width
            symmetric = (texts, other_images[start:stop]) if self.symmetric_logits else (None, None)
            # Text start + j is the partner of image start + j: diagonal(-start) of the block.
            offset = -start if same_batch else None
            total = total + checkpoint(
                _sigmoid_block_sum,
                images,
                other_texts[start:stop],
                *symmetric,
                scale,
                bias,
                offset,
                use_reentrant=False,
            )
        return total

    def _ring_loss(self, images: Tensor, texts: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        """SigLIP §3.3: pass (text, image) features one rank to the right W-1 times; positives
        only in the block of this rank's own texts. Each rank sums its images' rows; a
        differentiable all-reduce turns them into the global loss on every rank."""
        sizes = dist_utils.gather_sizes(images.shape[0], images.device)
        world, me = len(sizes), dist_utils.rank()
        right, left = (me + 1) % world, (me - 1) % world
        width = texts.shape[1]
        # Images travel too only when the symmetric logits need them.
        packet = torch.cat([texts, images], dim=1) if self.symmetric_logits else texts
        total = self._chunked_sum(images, texts, images, texts, scale, bias, True)
        for step in range(1, world):
            source = (me - step) % world
            packet = dist_utils.neighbour_exchange_with_grad(packet, right, left, sizes[source])
            other_texts, other_images = packet[:, :width], packet[:, width:]
            total = total + self._chunked_sum(images, texts, other_images, other_texts, scale, bias, False)
        return dist_utils.all_reduce_sum_with_grad(total) / sum(sizes)


class ClipLoss(nn.Module):
    """Softmax contrastive loss of CLIP (Radford et al., ICML 2021), the alternative to SigLIP.

    ``logits = exp(t) * x_img @ x_txt^T`` over the global batch; the loss is the mean of the
    image->text and text->image cross-entropies with the matching pair as the target. The
    learnable log-temperature starts at log(1/0.07) and the scale is clipped at 100 (CLIP §2.5).
    Under DDP the features are all-gathered with gradients and every rank computes the global
    loss (convention in :mod:`med3dvlm.models.distributed`).
    """

    def __init__(self, init_logit_scale: float = CLIP_INIT_LOGIT_SCALE, gather: bool = True) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.gather = gather

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        _check_pairs(image_features, text_features)
        dtype = torch.promote_types(image_features.dtype, self.logit_scale.dtype)
        images, texts = image_features.to(dtype), text_features.to(dtype)
        if self.gather and dist_utils.is_distributed():
            sizes = dist_utils.gather_sizes(images.shape[0], images.device)
            images = dist_utils.all_gather_with_grad(images, sizes)
            texts = dist_utils.all_gather_with_grad(texts, sizes)
        scale = self.logit_scale.to(dtype).exp().clamp(max=CLIP_MAX_LOGIT_SCALE)
        logits = scale * images @ texts.T
        targets = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def check_loss_is_finite(loss: Tensor | float, step: int) -> None:
    """Raise a RuntimeError that says what to do when the training loss is NaN or infinite."""
    value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if math.isfinite(value):
        return
    kind = "NaN" if math.isnan(value) else "infinite"
    raise RuntimeError(
        f"The contrastive loss became {kind} at step {step}. Lower the learning rate or enable "
        "gradient clipping, check the data for empty/constant volumes or empty reports, and "
        "with bf16/fp16 check that the logit scale has not grown out of range."
    )


def embedding_spread(embeddings: Tensor) -> float:
    """Root of the total variance of a batch of embeddings: ~1 for random unit vectors, 0 when
    every sample maps to the same point."""
    return float(embeddings.detach().float().var(dim=0, unbiased=False).sum().sqrt())


class LossHealthMonitor:
    """Per-step guard for contrastive training: fails fast on a NaN/Inf loss and detects the
    collapse in which every sample gets the same embedding (the loss then sits at its trivial
    value while training looks alive).

    Collapse is declared once the spread of any embedding batch stays below ``collapse_threshold``
    for ``patience`` consecutive steps; ``on_collapse`` chooses between raising and warning.
    """

    def __init__(
        self,
        patience: int = 50,
        collapse_threshold: float = 1e-3,
        on_collapse: Literal["raise", "warn"] = "raise",
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1 step, got {patience}.")
        if on_collapse not in ("raise", "warn"):
            raise ValueError(f"on_collapse must be 'raise' or 'warn', got {on_collapse!r}.")
        self.patience = patience
        self.collapse_threshold = collapse_threshold
        self.on_collapse = on_collapse
        self.collapsed_steps = 0

    def check(self, loss: Tensor | float, step: int, **embeddings: Tensor) -> None:
        """Call every training step, e.g. ``monitor.check(loss, step, image=img, text=txt)``."""
        check_loss_is_finite(loss, step)
        spreads = {name: embedding_spread(e) for name, e in embeddings.items() if e.shape[0] > 1}
        if not spreads:
            return
        name, spread = min(spreads.items(), key=lambda item: item[1])
        if spread >= self.collapse_threshold:
            self.collapsed_steps = 0
            return
        self.collapsed_steps += 1
        if self.collapsed_steps < self.patience:
            return
        message = (
            f"Embedding collapse at step {step}: the {name} embeddings have been (nearly) "
            f"identical across the batch for {self.collapsed_steps} steps (spread {spread:.2e} < "
            f"{self.collapse_threshold:.0e}), so the loss is stuck at its trivial value. Lower the "
            "learning rate, check that batches hold different samples (shuffling, data loading) "
            "and that the encoders receive real inputs."
        )
        if self.on_collapse == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
