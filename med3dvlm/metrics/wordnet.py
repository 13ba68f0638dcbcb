"""Offline WordNet 3.0 for METEOR's synonym stage (built by ``python -m med3dvlm.wordnet``).

The paper's METEOR (SPEC §7) is NLTK's, with WordNet synonyms. NLTK's downloader needs the
internet; Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages ship the same WordNet 3.0
database files in ``/usr/share/wordnet``. NLTK reads them once they sit in an nltk_data tree as
``corpora/wordnet/`` together with a ``lexnames`` file, which Debian does not ship (its content is
the table of the ``lexnames(5WN)`` manual page, reproduced below). This command builds that tree
where the text metrics look for it (:func:`med3dvlm.metrics.text.default_nltk_data_dir`:
``$MED3DVLM_NLTK_DATA`` if set, else ``$XDG_CACHE_HOME/med3dvlm/nltk_data``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from med3dvlm.metrics.text import default_nltk_data_dir

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")

# The database files NLTK's WordNetCorpusReader opens (all but lexnames come from Debian).
WORDNET_FILES = (
    "cntlist.rev",
    "index.sense",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)

# WordNet 3.0 lexicographer files, numbered as in lexnames(5WN); the number is the ``lex_filenum``
# field of every synset in the data.* files, so the order matters.
LEXICOGRAPHER_FILES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
# Syntactic category column of lexnames: 1 noun, 2 verb, 3 adjective, 4 adverb.
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_text() -> str:
    """The ``lexnames`` file: ``NN<TAB>name<TAB>category`` per line, 45 lines."""
    return "".join(
        f"{index:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for index, name in enumerate(LEXICOGRAPHER_FILES)
    )


def missing_wordnet_files(source: Path) -> list[str]:
    return [name for name in WORDNET_FILES if not (source / name).is_file()]


def build_nltk_wordnet(source: Path = DEBIAN_WORDNET_DIR, nltk_data_dir: Path | None = None) -> Path:
    """Copy the WordNet database from ``source`` into ``<nltk_data_dir>/corpora/wordnet``.

    Returns the ``corpora/wordnet`` folder. Files already there are replaced, so rerunning is safe.
    """
    source = Path(source)
    missing = missing_wordnet_files(source)
    if missing:
        raise FileNotFoundError(
            f"WordNet 3.0 files {', '.join(missing)} are missing from {source}. On Debian/Ubuntu run "
            f"`apt-get install -y {' '.join(DEBIAN_PACKAGES)}` (or `make wordnet`), or pass source=DIR "
            "with a folder holding the WordNet 3.0 dict files."
        )
    target = Path(nltk_data_dir or default_nltk_data_dir()) / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        shutil.copyfile(source / name, target / name)
    (target / "lexnames").write_text(lexnames_text(), encoding="utf-8")
    return target
