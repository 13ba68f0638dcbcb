"""Command-line demo: one volume, one question, the answer on stdout.

    python -m med3dvlm.demo model_dir=exports/vlm image=scan.nii.gz question="Which organ has a lesion?"
    python -m med3dvlm.demo model_dir=exports/vlm image=scan.nii.gz            # no question: a report
    python -m med3dvlm.demo model_dir=exports/siglip image=scan.nii.gz texts="Liver lesion.|No lesion." k=1
    python -m med3dvlm.demo model_dir=exports/vlm image=dicom_series_folder/     # or series.zip

``image`` is a prepared volume (``.nii``, ``.nii.gz``, ``.npy`` in [0, 1]) or raw CT: a NIfTI in HU, a
DICOM series folder or a ``.zip`` of one (``series=`` picks one series of a folder holding several).
Raw CT goes through the preprocessing the model's training data had (``preprocessing.json``).

A VLM answers (with ``choices="a|b|c|d"`` as a closed question); a stage-1 model ranks ``texts``
(``|``-separated, or ``@file`` with one per line; a ``question`` is ranked with them) by similarity
to the volume. Mistakes (a missing file, an unreadable volume, a bad key) print a message and exit
with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from med3dvlm.cli import Option, UsageError, fail, parse_key_values, parse_list, reports_mistakes, usage, wants_help

PROGRAM = "med3dvlm.demo"
OPTIONS = {
    "model_dir": Option("an export folder (python -m med3dvlm.export) or a training checkpoint", required=True),
    "image": Option("the volume: .nii / .nii.gz / .npy, a DICOM series folder or a .zip of one", required=True),
    "series": Option("DICOM: the SeriesInstanceUID or number to read from a folder of several", default=None),
    "question": Option("the question; without one a VLM writes a report", default=""),
    "choices": Option("four answers a|b|c|d: asks a closed question", default=None, parse=parse_list),
    "texts": Option("stage-1 model: texts to rank, a|b|c or @file (one per line)", default=None, parse=parse_list),
    "k": Option("stage-1 model: how many texts to print", default=5, parse=int),
    "max_new_tokens": Option("VLM: longest answer, in tokens (default: 256)", default=None, parse=int),
    "device": Option("cpu, cuda, ... (default: cpu)", default=None),
    "dtype": Option("float32, bfloat16, ... (default: as saved)", default=None),
}


def run(settings: dict) -> str:
    """The demo's output for parsed ``settings`` (see ``OPTIONS``)."""
    from med3dvlm.api import load_model, question_prompt, read_input

    question = settings["question"].strip()
    if settings["choices"] is not None and not question:
        raise UsageError("choices= needs a question=")
    prompt = question_prompt(question, settings["choices"]) if question else None
    volume = read_input(settings["image"], series=settings["series"])  # a bad file fails before the (slow) model load
    model = load_model(settings["model_dir"], device=settings["device"], dtype=settings["dtype"])
    if model.kind == "vlm":
        if settings["texts"]:
            raise UsageError("texts= ranks texts with a stage-1 model; this is a VLM: ask a question instead")
        if prompt is None:
            return f"report: {model.describe(volume, max_new_tokens=settings['max_new_tokens'])}"
        answer = model.generate(volume, prompt, max_new_tokens=settings["max_new_tokens"])
        return f"question: {prompt}\nanswer: {answer}"
    texts = list(settings["texts"] or [])
    if question and question not in texts:
        texts.append(question)
    if not texts:
        raise UsageError(
            "this is a stage-1 (retrieval) model: it answers no questions but ranks texts by similarity to the "
            'volume; give texts="first|second|..." (or texts=@file.txt, one per line)'
        )
    matches = model.retrieve_texts(volume, texts, k=settings["k"])
    lines = [f"image -> text retrieval, top {len(matches)} of {len(texts)} texts (cosine similarity):"]
    lines += [f"{rank:>3}. {match.score:+.4f}  {match.label}" for rank, match in enumerate(matches, start=1)]
    return "\n".join(lines)


@reports_mistakes(PROGRAM)  # a missing file, an unreadable volume or checkpoint: one line, status 2
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(__doc__.strip() + "\n\n" + usage(PROGRAM, OPTIONS))
        return 0
    try:
        settings = parse_key_values(argv, OPTIONS)
    except UsageError as error:
        return fail(str(error), PROGRAM, OPTIONS)
    print(run(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
