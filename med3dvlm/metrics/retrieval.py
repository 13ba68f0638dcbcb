"""Image-text retrieval metrics of the paper's protocol (SPEC §7).

Pair ``i`` of the image and text embeddings match. Keys name the direction explicitly:

- ``i2t_R@K`` (image->text): each image is a query and all texts are ranked. This is what the
  retrieval literature calls *text retrieval* (TR).
- ``t2i_R@K`` (text->image): each text is a query and all images are ranked, i.e. *image
  retrieval* (IR). Papers, M3D's included, use "IR"/"TR" loosely, so compare against a table only
  after checking which direction its columns mean.

Recall values are fractions in [0, 1]; :func:`format_retrieval_table` prints percentages, as the
paper does. Ties are counted pessimistically: a query's rank is the number of *other* candidates
whose similarity is greater than **or equal to** the true partner's, and R@K counts rank < K.
Identical embeddings therefore never inflate a score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# SPEC §7: retrieval on the first N test pairs, N in {100, 500, 1000, 2000}; recall at 1, 5, 10.
PAPER_SIZES = (100, 500, 1000, 2000)
PAPER_KS = (1, 5, 10)
# Queries scored per matrix product; keeps memory at (chunk x N) for large sets.
_QUERY_CHUNK = 1024


def chance_recall(n: int, k: int) -> float:
    """Expected R@K of random ranking among ``n`` candidates."""
    return min(k, n) / n


def _prepare(image_emb: Tensor, text_emb: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            "Retrieval needs image and text embeddings of the same shape (pairs, width) with row "
            f"i of each forming a pair; got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}."
        )
    # float64 on the CPU: exact enough that equal embeddings give exactly equal similarities.
    images = image_emb.detach().to("cpu", torch.float64)
    texts = text_emb.detach().to("cpu", torch.float64)
    for name, emb in (("image", images), ("text", texts)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"The {name} embeddings contain NaN or Inf; retrieval is undefined.")
    if normalize:
        images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    return images, texts


def _pessimistic_ranks(queries: Tensor, candidates: Tensor) -> Tensor:
    """0-based rank of candidate ``i`` for query ``i``, ties counted against the query."""
    ranks = []
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        similarity = queries[start : start + _QUERY_CHUNK] @ candidates.T
        rows = torch.arange(similarity.shape[0])
        partner = similarity[rows, rows + start]
        # ">=" counts the partner itself once; subtract it.
        ranks.append((similarity >= partner[:, None]).sum(dim=1) - 1)
    return torch.cat(ranks)


def retrieval_ranks(image_emb: Tensor, text_emb: Tensor, normalize: bool = True) -> dict[str, Tensor]:
    """Per-query 0-based ranks of the true partner: ``{"i2t": (N,), "t2i": (N,)}``.

    Similarity is the dot product, of L2-normalised embeddings (cosine) when ``normalize``.
    """
    images, texts = _prepare(image_emb, text_emb, normalize)
    return {"i2t": _pessimistic_ranks(images, texts), "t2i": _pessimistic_ranks(texts, images)}


def retrieval_recalls(
    image_emb: Tensor,
    text_emb: Tensor,
    ks: Sequence[int] = PAPER_KS,
    normalize: bool = True,
) -> dict[str, float]:
    """Recall@K in both directions over all pairs: keys ``i2t_R@K`` then ``t2i_R@K``."""
    ranks = retrieval_ranks(image_emb, text_emb, normalize)
    return {
        f"{direction}_R@{k}": float((ranks[direction] < k).double().mean()) for direction in ("i2t", "t2i") for k in ks
    }


def retrieval_protocol(
    image_emb: Tensor,
    text_emb: Tensor,
    sizes: Sequence[int] = PAPER_SIZES,
    ks: Sequence[int] = PAPER_KS,
    normalize: bool = True,
) -> dict[int, dict[str, float]]:
    """SPEC §7: recalls on the first N pairs for every N in ``sizes`` the set can supply.

    A set smaller than every size (a small or synthetic test set) is scored once on all its
    pairs, so the protocol always yields at least one row. Keys are the numbers of pairs.
    """
    available = image_emb.shape[0]
    if available == 0:
        raise ValueError("Retrieval needs at least one image-text pair; got none.")
    chosen = sorted(n for n in set(sizes) if n <= available) or [available]
    return {n: retrieval_recalls(image_emb[:n], text_emb[:n], ks, normalize) for n in chosen}


def format_retrieval_table(results: Mapping[int, Mapping[str, float]]) -> str:
    """Markdown table of :func:`retrieval_protocol` output, one row per N, recalls in percent."""
    if not results:
        raise ValueError("No retrieval results to format.")
    keys = list(next(iter(results.values())))
    names = {"i2t": "image->text", "t2i": "text->image"}
    header = ["pairs"] + [f"{names[k.split('_')[0]]} {k.split('_', 1)[1]}" for k in keys]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for n, row in results.items():
        lines.append("| " + " | ".join([str(n)] + [f"{100 * row[k]:.2f}" for k in keys]) + " |")
    return "\n".join(lines)
