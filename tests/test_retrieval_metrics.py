"""Retrieval metrics against a direct Python computation, on embeddings with exact ties."""

from __future__ import annotations

import pytest
import torch

from med3dvlm.metrics import retrieval
from med3dvlm.metrics.retrieval import (
    chance_recall,
    format_retrieval_table,
    retrieval_protocol,
    retrieval_recalls,
)


def integer_embeddings(n: int, width: int = 3, seed: int = 0):
    """Small-integer vectors: many exactly equal similarities, computed exactly in any order."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(-2, 3, (n, width), generator=generator).float()
    text = torch.randint(-2, 3, (n, width), generator=generator).float()
    return image, text


def recalls_by_loop(image, text, ks):
    """Query i hits at K when fewer than K other candidates score >= its partner."""
    image, text = image.tolist(), text.tolist()
    n = len(image)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    results = {}
    for direction, queries, candidates in (("i2t", image, text), ("t2i", text, image)):
        ranks = []
        for i in range(n):
            partner = dot(queries[i], candidates[i])
            ranks.append(sum(1 for j in range(n) if j != i and dot(queries[i], candidates[j]) >= partner))
        for k in ks:
            results[f"{direction}_R@{k}"] = sum(rank < k for rank in ranks) / n
    return results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recalls_match_loop_with_ties(seed, monkeypatch):
    # Small query chunks exercise the chunk offsets as well.
    monkeypatch.setattr(retrieval, "_QUERY_CHUNK", 7)
    image, text = integer_embeddings(40, seed=seed)
    ks = (1, 3, 5, 10)
    got = retrieval_recalls(image, text, ks=ks, normalize=False)
    assert list(got) == [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks]
    assert got == pytest.approx(recalls_by_loop(image, text, ks), abs=0)


def test_ties_count_against_the_query():
    # Texts 0 and 1 are identical: image 0 cannot rank its partner strictly first.
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    got = retrieval_recalls(image, text, ks=(1, 2))
    assert got["i2t_R@1"] == pytest.approx(1 / 3)  # only image 2 retrieves its text first
    # Image 0 ties with text 1 (rank 1); image 1 scores 0 on every text (rank 2).
    assert got["i2t_R@2"] == pytest.approx(2 / 3)
    # All identical embeddings: every query ties with all n candidates, rank n - 1.
    same = torch.ones(5, 4)
    got = retrieval_recalls(same, same, ks=(1, 4, 5))
    assert got == {f"{d}_R@{k}": float(k == 5) for d in ("i2t", "t2i") for k in (1, 4, 5)}


def test_perfect_embeddings_recall_everything():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(64, 16, generator=generator)
    got = retrieval_recalls(image, 3.0 * image)  # cosine similarity ignores the scale
    assert got == {f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_swapped_directions_are_distinguished():
    # Image 0 is close to every text; text 0 is close only to image 0.
    image = torch.tensor([[1.0, 1.0, 1.0], [0, 1.0, 0], [0, 0, 1.0]])
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    got = retrieval_recalls(image, text, ks=(1,), normalize=False)
    assert got["i2t_R@1"] == pytest.approx(2 / 3)  # image 0's three texts all score 1
    assert got["t2i_R@1"] == pytest.approx(1 / 3)  # texts 1, 2 tie with image 0


@pytest.mark.parametrize(
    ("n", "expected_sizes"),
    [(2000, [100, 500, 1000, 2000]), (1200, [100, 500, 1000]), (100, [100]), (37, [37])],
)
def test_protocol_uses_the_first_n_pairs_for_each_size(n, expected_sizes):
    image, text = integer_embeddings(n, width=6, seed=5)
    results = retrieval_protocol(image, text)
    assert list(results) == expected_sizes
    smallest = expected_sizes[0]
    assert results[smallest] == retrieval_recalls(image[:smallest], text[:smallest])


def test_table_prints_percentages():
    image, text = integer_embeddings(120, width=6, seed=7)
    results = retrieval_protocol(image, text, sizes=(50, 100), ks=(1, 5))
    table = format_retrieval_table(results).splitlines()
    assert table[0] == ("| pairs | image->text R@1 | image->text R@5 | text->image R@1 | text->image R@5 |")
    assert len(table) == 4
    row = results[100]
    assert table[3] == "| 100 | " + " | ".join(f"{100 * v:.2f}" for v in row.values()) + " |"


def test_chance_level():
    assert chance_recall(2000, 1) == pytest.approx(0.0005)
    assert chance_recall(100, 10) == pytest.approx(0.1)
    assert chance_recall(3, 5) == 1.0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        retrieval_recalls(torch.ones(3, 4), torch.ones(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recalls(torch.full((3, 4), float("nan")), torch.ones(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        retrieval_protocol(torch.ones(0, 4), torch.ones(0, 4))
