"""Offline WordNet for METEOR: ``python -m med3dvlm.wordnet [source=/usr/share/wordnet] [target=DIR]``.

Copies Debian's WordNet 3.0 (``wordnet-base``, ``wordnet-sense-index``; ``make wordnet`` installs
them) into the nltk_data tree the text metrics read (the work is in :mod:`med3dvlm.metrics.wordnet`;
keys in ``configs/wordnet.yaml``). Exit status 1 when NLTK cannot read the result, 2 when the
source files are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from med3dvlm.cli import hydra_command

PROGRAM = "med3dvlm.wordnet"
UNREADABLE_EXIT_CODE = 1


@hydra_command(PROGRAM, "wordnet")
def main(cfg: Any) -> None:
    from med3dvlm.metrics.text import load_wordnet
    from med3dvlm.metrics.wordnet import build_nltk_wordnet

    folder = build_nltk_wordnet(Path(cfg.source), None if cfg.target is None else Path(cfg.target))
    try:
        wordnet = load_wordnet(folder.parent.parent)
    except ImportError as error:
        raise SystemExit(f"error: WordNet copied to {folder}, but NLTK cannot read it here: {error}") from None
    if wordnet is None:
        raise SystemExit(f"error: NLTK could not read the WordNet built in {folder}")
    print(f"WordNet {wordnet.get_version()} ready for NLTK in {folder}")


if __name__ == "__main__":
    raise SystemExit(main())
