"""Command-line demo: one volume, one question, the answer on stdout.

    python -m med3dvlm.demo model_dir=exports/vlm image=scan.nii.gz 'question="Which organ has a lesion?"'
    python -m med3dvlm.demo model_dir=exports/vlm image=scan.nii.gz            # no question: a report
    python -m med3dvlm.demo model_dir=exports/siglip image=scan.nii.gz texts="Liver lesion.|No lesion." k=1
    python -m med3dvlm.demo model_dir=exports/vlm image=dicom_series_folder/     # or series.zip

``image`` is a prepared volume (``.nii``, ``.nii.gz``, ``.npy`` in [0, 1]) or raw CT: a NIfTI in HU, a
DICOM series folder or a ``.zip`` of one (``series=`` picks one series of a folder holding several).
Raw CT goes through the preprocessing the model's training data had (``preprocessing.json``).

A VLM answers (with ``choices="a|b|c|d"`` as a closed question); a stage-1 model ranks ``texts``
(``|``-separated, or ``@file`` with one per line; a ``question`` is ranked with them) by similarity
to the volume. The keys are those of ``configs/demo.yaml`` (``--help`` lists them). Mistakes (a
missing file, an unreadable volume, a bad key) print a message and exit with status 2.
"""

from __future__ import annotations

from typing import Any

from med3dvlm.cli import UsageError, hydra_command, list_value, number

PROGRAM = "med3dvlm.demo"


def run(settings: Any) -> str:
    """The demo's output for ``settings`` (the keys of ``configs/demo.yaml``)."""
    from med3dvlm.api import load_model, question_prompt, read_input

    model_dir = str(settings["model_dir"])  # a missing model_dir= is named before anything is read
    k, max_new_tokens = number(settings, "k", int), number(settings, "max_new_tokens", int)
    question = str(settings["question"] or "").strip()
    choices = list_value(settings["choices"], "choices")
    if choices is not None and not question:
        raise UsageError("choices= needs a question=")
    prompt = question_prompt(question, choices) if question else None
    series = None if settings["series"] is None else str(settings["series"])
    volume = read_input(str(settings["image"]), series=series)  # a bad file fails before the (slow) model load
    model = load_model(model_dir, device=settings["device"], dtype=settings["dtype"])
    if model.kind == "vlm":
        if settings["texts"]:
            raise UsageError("texts= ranks texts with a stage-1 model; this is a VLM: ask a question instead")
        if prompt is None:
            return f"report: {model.describe(volume, max_new_tokens=max_new_tokens)}"
        answer = model.generate(volume, prompt, max_new_tokens=max_new_tokens)
        return f"question: {prompt}\nanswer: {answer}"
    texts = list_value(settings["texts"], "texts") or []
    if question and question not in texts:
        texts.append(question)
    if not texts:
        raise UsageError(
            "this is a stage-1 (retrieval) model: it answers no questions but ranks texts by similarity to the "
            'volume; give texts="first|second|..." (or texts=@file.txt, one per line)'
        )
    matches = model.retrieve_texts(volume, texts, k=k)
    lines = [f"image -> text retrieval, top {len(matches)} of {len(texts)} texts (cosine similarity):"]
    lines += [f"{rank:>3}. {match.score:+.4f}  {match.label}" for rank, match in enumerate(matches, start=1)]
    return "\n".join(lines)


@hydra_command(PROGRAM, "demo")  # a missing file, an unreadable volume or checkpoint: one line, status 2
def main(cfg: Any) -> None:
    print(run(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
