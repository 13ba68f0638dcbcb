"""Using a trained model from Python: embed, retrieve, ask, describe.

    import med3dvlm
    model = med3dvlm.load_model("exports/vlm")      # an export folder, or a training checkpoint
    model.ask("scan.nii.gz", "Which organ has a lesion?")

:func:`load_model` returns a :class:`RetrievalModel` for a stage-1 (SigLIP/CLIP) model and a
:class:`VisionLanguageModel` for a VLM (stages 2-3). A volume argument is a path or an array /
tensor of shape ``(D, H, W)`` or ``(1, D, H, W)``:

* a **prepared volume** (values in [0, 1]: ``prepare``'s output, the phantoms, M3D's ``.npy``) is used
  as it is, only resized to the model's volume size;
* **raw CT** (a DICOM series folder, its ``.zip``, a NIfTI in HU, or an array in HU in display order)
  goes through the preprocessing the model's training data had (``preprocessing.json`` of the export,
  the run config of a checkpoint; see ``med3dvlm.data.preprocessing``): the same HU window, crop and
  resize as ``python -m med3dvlm.prepare``. A model that records none refuses raw input with a message
  (pass ``preprocessing=`` to :func:`load_model` to say what it is); nothing is min-max scaled silently.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from med3dvlm.data import layout
from med3dvlm.data.preprocessing import Preprocessing

log = logging.getLogger(__name__)

VolumeLike = str | os.PathLike | np.ndarray | torch.Tensor
# Decoding length when the caller gives none: a phantom report is ~60 tokens, an M3D one ~150.
DEFAULT_MAX_NEW_TOKENS = 256
# Volumes encoded per forward pass in retrieve_volumes / embed_images.
EMBED_BATCH_SIZE = 8


@dataclass(frozen=True)
class Match:
    """One retrieval result: ``index`` into the candidates, their ``label`` (text or file name), score."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class InputVolume:
    """A volume as read, before the model's preprocessing: ``prepared`` (in [0, 1]) or raw (e.g. HU)."""

    array: np.ndarray  # (1, D, H, W) float32
    prepared: bool
    label: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[1:])


def is_prepared(array: np.ndarray) -> bool:
    """Prepared volumes lie in [0, 1]; CT in HU never does (air is about -1000)."""
    return is_prepared_range(float(array.min()), float(array.max()))


def is_prepared_range(low: float, high: float) -> bool:
    return low >= 0.0 and high <= 1.0


def import_readers() -> None:
    """Import what reading an input needs (imported lazily elsewhere), so that processes forked
    afterwards, DataLoader workers, read at once instead of each importing it first (~0.7 s each)."""
    import gzip  # noqa: F401 - the fallback and general path
    import importlib.util

    import nibabel.orientations  # noqa: F401
    import pydicom  # noqa: F401

    import med3dvlm.data.ct  # noqa: F401
    import med3dvlm.data.preprocessing  # noqa: F401
    import med3dvlm.data.transforms  # noqa: F401 - MONAI's transforms

    if importlib.util.find_spec("deflate") is not None:  # missing: the zlib fallback reads every file
        import deflate  # noqa: F401


def read_input(volume: VolumeLike | InputVolume, series: str | None = None, index: int = 0) -> InputVolume:
    """A path (NIfTI, ``.npy``, DICOM series folder or ``.zip``: errors name the file) or an array,
    read once and told prepared or raw. ``series``: which DICOM series of a folder holding several."""
    if isinstance(volume, InputVolume):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        from med3dvlm.data.ct import decode_nifti, load_ct
        from med3dvlm.data.volumes import load_volume

        path = Path(volume)
        name = path.name.lower()
        if path.is_dir() or name.endswith(".zip"):
            return InputVolume(load_ct(path, series=series).volume[np.newaxis], False, str(path))
        if name.endswith(".nii.gz"):  # decompressed once, then told prepared or raw CT
            decoded = decode_nifti(path)
            if is_prepared_range(*decoded.value_range()):
                return InputVolume(decoded.as_stored()[np.newaxis], True, str(path))
            return InputVolume(decoded.as_ct().volume[np.newaxis], False, str(path))
        array = load_volume(path)  # .npy, or .nii read through a memory map (cheap to read twice)
        if is_prepared(array):
            return InputVolume(array, True, str(path))
        if name.endswith(".nii"):  # raw CT: read again in display orientation
            array = load_ct(path).volume[np.newaxis]
        return InputVolume(array, False, str(path))
    array = volume_array(volume)
    return InputVolume(array, is_prepared(array), f"volume {index}")


def volume_array(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(1, D, H, W)`` finite float32 from an array or tensor, else a ValueError saying why."""
    array = volume.detach().cpu().float().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or min(array.shape) == 0:
        raise ValueError(f"a volume array must be (D, H, W) or (1, D, H, W), no axis empty; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise ValueError(f"a volume array must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError("the volume array holds NaN or infinite values")
    return np.ascontiguousarray(array[np.newaxis])


def model_input(
    volume: VolumeLike | InputVolume, image_size: Sequence[int] | None, preprocessing: Preprocessing | None = None
) -> torch.Tensor:
    """``(1, D, H, W)`` float32 in [0, 1] at ``image_size`` (the model's trained size; None = as is).

    A prepared volume is only resized; raw input goes through ``preprocessing`` first (what
    ``prepare`` does), and is refused when there is none."""
    from med3dvlm.data.transforms import IMAGE_KEY

    read = read_input(volume)
    array = read.array
    if not read.prepared:
        if preprocessing is None:
            raise ValueError(
                f"{read.label}: values {float(array.min()):.4g} to {float(array.max()):.4g} lie outside [0, 1], so this "
                "is raw input (e.g. CT in HU), and the model records no preprocessing for it (its training data had no "
                "preprocessing.json). Prepare the volume with `python -m med3dvlm.prepare`, or load the model with "
                "load_model(..., preprocessing=Preprocessing(hu_window=(lower, upper)))"
            )
        array = preprocessing.apply(array[0], where=read.label)[np.newaxis]
    size = None if image_size is None else tuple(int(n) for n in image_size)
    if size is None or tuple(array.shape[1:]) == size:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return _resize_to(size)({IMAGE_KEY: array})[IMAGE_KEY]


@functools.lru_cache(maxsize=8)
def _resize_to(image_size: tuple[int, ...]):
    """The eval transform for one size, built once (a MONAI Compose costs ~0.3 ms to build, a tenth of
    preparing a scan)."""
    from med3dvlm.data.transforms import eval_transforms

    return eval_transforms(image_size)


def volume_label(volume: VolumeLike | InputVolume, index: int) -> str:
    if isinstance(volume, InputVolume):
        return volume.label
    return str(volume) if isinstance(volume, (str, os.PathLike)) else f"volume {index}"


def _top_k(scores: torch.Tensor, labels: Sequence[str], k: int) -> list[Match]:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    values, indices = torch.topk(scores, min(k, scores.numel()))
    return [Match(int(i), labels[int(i)], float(v)) for v, i in zip(values, indices)]


def _parameter(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


class RetrievalModel:
    """A stage-1 model: image and text embeddings in one space, compared by cosine similarity.

    Embeddings are L2-normalised (SPEC §3), so a dot product is the cosine.
    """

    kind = "retrieval"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_size: Sequence[int] | None,
        max_text_tokens: int = 512,
        preprocessing: Preprocessing | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = None if image_size is None else tuple(int(n) for n in image_size)
        self.max_text_tokens = int(max_text_tokens)
        self.preprocessing = preprocessing  # applied to raw input (module docstring)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RetrievalModel:
        from med3dvlm.data.preprocessing import read_preprocessing
        from med3dvlm.models.contrastive import load_pretrained_contrastive

        model, tokenizer, config = load_pretrained_contrastive(path)
        return cls(
            model, tokenizer, config["image_size"], config["text_encoder"]["max_length"], read_preprocessing(path)
        )

    def model_input(self, volume: VolumeLike | InputVolume) -> torch.Tensor:
        """``(1, D, H, W)``: the volume as this model reads it."""
        return model_input(volume, self.image_size, self.preprocessing)

    @torch.no_grad()
    def embed_images(self, volumes: Sequence[VolumeLike], batch_size: int = EMBED_BATCH_SIZE) -> torch.Tensor:
        """``(N, embed_dim)`` unit vectors, on the CPU."""
        parameter = _parameter(self.model.image_encoder)
        chunks = []
        for start in range(0, len(volumes), batch_size):
            batch = torch.stack([self.model_input(v) for v in volumes[start : start + batch_size]])
            chunks.append(self.model.encode_image(batch.to(parameter.device, parameter.dtype)).float().cpu())
        if not chunks:
            raise ValueError("no volumes given")
        return torch.cat(chunks)

    def embed_image(self, volume: VolumeLike) -> torch.Tensor:
        """``(embed_dim,)`` unit vector of one volume."""
        return self.embed_images([volume])[0]

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, embed_dim)`` unit vectors. A text over the model's token budget is shortened as the
        evaluation does (SPEC §3: first sentence, then the others in order while they fit)."""
        from med3dvlm.stages.contrastive import fit_report_to_budget

        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")

        def count_tokens(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

        fitted = [fit_report_to_budget(text, count_tokens, self.max_text_tokens) for text in texts]
        tokens = self.tokenizer(
            fitted, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        device = _parameter(self.model.text_projection).device
        embedded = self.model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return embedded.float().cpu()

    def embed_text(self, text: str) -> torch.Tensor:
        return self.embed_texts([text])[0]

    def similarity(self, volume: VolumeLike, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of the volume with each text, ``(N,)``."""
        return self.embed_texts(texts) @ self.embed_image(volume)

    def retrieve_texts(self, volume: VolumeLike, texts: Sequence[str], k: int = 5) -> list[Match]:
        """The ``k`` texts closest to the volume, best first (image -> text retrieval)."""
        return _top_k(self.similarity(volume, texts), list(texts), k)

    def retrieve_volumes(self, text: str, volumes: Sequence[VolumeLike], k: int = 5) -> list[Match]:
        """The ``k`` volumes closest to the text, best first (text -> image retrieval)."""
        scores = self.embed_images(volumes) @ self.embed_text(text)
        return _top_k(scores, [volume_label(v, i) for i, v in enumerate(volumes)], k)


def question_prompt(question: str, choices: Sequence[str] | dict[str, str] | None = None) -> str:
    """The question as the VLM was trained on it: as it is, or with four ``choices`` (a list, or a
    dict keyed A-D) in the closed format ``"{question} Choices: A. .. B. .. C. .. D. .."`` (SPEC §6)."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    if choices is None:
        return question
    if isinstance(choices, dict):
        options = {str(letter).upper(): str(text) for letter, text in choices.items()}
    elif isinstance(choices, str) or len(choices) != len(layout.ANSWER_LETTERS):
        options = {}
    else:
        options = dict(zip(layout.ANSWER_LETTERS, (str(choice) for choice in choices)))
    if set(options) != set(layout.ANSWER_LETTERS):
        raise ValueError(
            "choices must be four answers, a list or a dict with keys A-D (the closed-question format the "
            f"model was trained on); got {choices!r}"
        )
    return layout.closed_prompt(question, options)


class VisionLanguageModel:
    """A VLM (:class:`med3dvlm.Med3DVLM`): answers questions about a volume and writes reports.

    Decoding is greedy (deterministic), as the evaluation's default; the prompts are the training
    formats (SPEC §5-6), so the model sees what it learned from.
    """

    kind = "vlm"

    def __init__(self, model: Any, max_new_tokens: int | None = None, preprocessing: Preprocessing | None = None):
        self.model = model.eval()
        self.max_new_tokens = max_new_tokens  # None: DEFAULT_MAX_NEW_TOKENS
        self.preprocessing = preprocessing  # applied to raw input (module docstring)

    @property
    def image_size(self) -> tuple[int, ...]:
        return self.model.image_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> VisionLanguageModel:
        from med3dvlm.data.preprocessing import read_preprocessing
        from med3dvlm.models.vlm import Med3DVLM

        return cls(Med3DVLM.from_pretrained(path, dtype=dtype), preprocessing=read_preprocessing(path))

    def model_input(self, volume: VolumeLike | InputVolume) -> torch.Tensor:
        """``(1, D, H, W)``: the volume as this model reads it."""
        return model_input(volume, self.image_size, self.preprocessing)

    def _images(self, volume: VolumeLike) -> torch.Tensor:
        parameter = _parameter(self.model.image_encoder)
        return self.model_input(volume).unsqueeze(0).to(parameter.device, parameter.dtype)

    @torch.no_grad()
    def embed_image(self, volume: VolumeLike) -> torch.Tensor:
        """The volume as the LLM sees it: ``(num_image_tokens, LLM width)`` projector outputs."""
        return self.model.encode_images(self._images(volume))[0].float().cpu()

    def prompt(self, question: str, choices: Sequence[str] | dict[str, str] | None = None) -> str:
        """The training prompt for ``question`` (see :func:`question_prompt`)."""
        return question_prompt(question, choices)

    def ask(
        self,
        volume: VolumeLike,
        question: str,
        choices: Sequence[str] | dict[str, str] | None = None,
        max_new_tokens: int | None = None,
    ) -> str:
        """The model's answer; with four ``choices`` it answers ``"<letter>. <choice>"`` (closed VQA)."""
        return self.generate(volume, self.prompt(question, choices), max_new_tokens)

    def describe(self, volume: VolumeLike, max_new_tokens: int | None = None) -> str:
        """A report of the volume (the report-generation prompt of training)."""
        return self.generate(volume, layout.CAPTION_PROMPT, max_new_tokens, task="caption")

    @torch.no_grad()
    def generate(
        self, volume: VolumeLike, prompt: str, max_new_tokens: int | None = None, task: str | None = None
    ) -> str:
        """Greedy answer to ``prompt`` as written (the image tokens are added). ``task`` ("caption" or a
        VQA task, the default) matters only to the released model, whose prompts differ by task."""
        tokens = next(n for n in (max_new_tokens, self.max_new_tokens, DEFAULT_MAX_NEW_TOKENS) if n is not None)
        images = self._images(volume)
        return self.model.answer(images, [prompt], tasks=[task], max_new_tokens=int(tokens))[0].strip()


Model = RetrievalModel | VisionLanguageModel


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    preprocessing: Preprocessing | dict | None = None,
) -> Model:
    """The model at ``path``, ready to use (eval mode): an export folder (``python -m med3dvlm.export``)
    or a training checkpoint (``.ckpt``) of stage 1 (-> :class:`RetrievalModel`) or 2-3
    (-> :class:`VisionLanguageModel`, LoRA merged). ``device`` / ``dtype`` (e.g. ``"cuda"``,
    ``"bfloat16"``) move it. ``preprocessing`` replaces the recorded one for raw input (e.g. for a
    model whose training data recorded none)."""
    from med3dvlm.data.preprocessing import as_preprocessing
    from med3dvlm.models.contrastive import CONTRASTIVE_CONFIG_FILE
    from med3dvlm.models.vlm import VLM_CONFIG_FILE

    path = Path(path)
    if path.is_dir():
        if (path / VLM_CONFIG_FILE).is_file():
            loaded: Model = VisionLanguageModel.from_pretrained(path)
        elif (path / CONTRASTIVE_CONFIG_FILE).is_file():
            loaded = RetrievalModel.from_pretrained(path)
        else:
            raise FileNotFoundError(
                f"{path} holds neither {VLM_CONFIG_FILE} (a VLM) nor {CONTRASTIVE_CONFIG_FILE} (a stage-1 model): "
                "write one with `python -m med3dvlm.export ckpt_path=<run>/checkpoints/last.ckpt out_dir=<dir>`"
            )
    elif path.is_file():
        loaded = _load_checkpoint(path)
    else:
        raise FileNotFoundError(f"{path} does not exist: give an export folder or a training checkpoint (.ckpt)")
    if preprocessing is not None:
        loaded.preprocessing = as_preprocessing(preprocessing)
    if device is not None or dtype is not None:
        loaded.model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return loaded


def _load_checkpoint(path: Path) -> Model:
    from med3dvlm.checkpoints import ContrastiveCheckpoint, load_checkpoint_model

    loaded, preprocessing = load_checkpoint_model(path)
    if isinstance(loaded, ContrastiveCheckpoint):
        return RetrievalModel(loaded.model, loaded.tokenizer, loaded.image_size, loaded.max_text_tokens, preprocessing)
    vlm = loaded.model
    vlm.merge_lora()
    return VisionLanguageModel(vlm, preprocessing=preprocessing)
