"""The Gradio page of ``python -m med3dvlm.app``: upload a volume, browse its slices, ask the model.

A ``.nii`` / ``.nii.gz`` volume (prepared, or CT in HU) or a ``.zip`` of one DICOM series: the
axial, coronal and sagittal slices appear, each with a slider. Raw CT goes through the preprocessing
the model's training data had; no header field of a DICOM file is shown. With a VLM, *Ask* answers
the question and *Describe* writes a report; with a stage-1 model both rank the candidate texts by
similarity to the volume. Other files, unreadable volumes and series, and uploads over
``max_upload_mb`` are refused with a message; no error reaches the page as a traceback (unexpected
ones are logged on the server).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# the largest upload accepted by default, in MB (configs/app.yaml max_upload_mb)
DEFAULT_MAX_UPLOAD_MB = 512.0
NIFTI_SUFFIXES = (".nii.gz", ".nii")
UPLOAD_SUFFIXES = (*NIFTI_SUFFIXES, ".zip")  # a .zip holds one DICOM series
# plane -> (its slider's axis in the (D, H, W) array, axis names of the 2D image it shows)
PLANES = {"axial": (0, "H x W"), "coronal": (1, "D x W"), "sagittal": (2, "D x H")}
# Slices are enlarged (nearest neighbour, integer factor) until their longer side reaches this,
# so a 32-voxel phantom is not a thumbnail; the browser then scales the image to its box.
DISPLAY_SIZE = 256
NO_VOLUME = "Upload a NIfTI volume (.nii or .nii.gz) or a .zip of one DICOM series."
MEGABYTE = 1024 * 1024


class UploadRejected(ValueError):
    """An upload the app does not read; the message is shown to the user as it is."""


@dataclass(frozen=True)
class LoadedVolume:
    """An uploaded volume as read (``(1, D, H, W)`` float32) and its intensity range for display."""

    name: str
    array: np.ndarray
    low: float
    high: float
    prepared: bool = True  # in [0, 1]; else raw CT (HU), preprocessed by the model

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[1:])


def read_upload(path: str | os.PathLike | None, max_upload_mb: float) -> LoadedVolume:
    """The uploaded file as a volume, or :class:`UploadRejected` saying why not."""
    from med3dvlm.api import read_input

    if path is None:
        raise UploadRejected(NO_VOLUME)
    path = Path(path)
    name = path.name
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise UploadRejected(
            f"{name} is neither NIfTI nor a zip: upload a .nii / .nii.gz volume or a .zip of one DICOM series."
        )
    size = path.stat().st_size
    if size > max_upload_mb * MEGABYTE:
        raise UploadRejected(
            f"{name} is {size / MEGABYTE:.1f} MB, above this app's limit of {max_upload_mb:g} MB "
            "(start it with max_upload_mb= to change the limit)."
        )
    try:
        read = read_input(path)
    except ValueError as error:  # DataError: missing, corrupt, wrong shape, NaN, a refused DICOM series
        raise UploadRejected(f"Cannot read {name}: {str(error).replace(str(path.parent) + '/', '')}") from None
    array = read.array
    return LoadedVolume(name, array, float(array.min()), float(array.max()), read.prepared)


def slice_count(volume: LoadedVolume, plane: str) -> int:
    return volume.shape[PLANES[plane][0]]


def slice_image(volume: LoadedVolume | None, plane: str, index: float) -> np.ndarray | None:
    """Slice ``index`` of ``plane`` as an 8-bit greyscale image (the volume's range -> 0..255)."""
    if volume is None:
        return None
    axis = PLANES[plane][0]
    index = int(min(max(int(index), 0), volume.shape[axis] - 1))
    plane_2d = np.take(volume.array[0], index, axis=axis)
    span = volume.high - volume.low
    scaled = (plane_2d - volume.low) / span if span > 0 else np.zeros_like(plane_2d)
    image = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    factor = max(1, math.ceil(DISPLAY_SIZE / max(image.shape)))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def volume_summary(volume: LoadedVolume, model_size: Sequence[int] | None, preprocessing: Any = None) -> str:
    d, h, w = volume.shape
    lines = [f"**{volume.name}**: {d} x {h} x {w} voxels (D x H x W), values {volume.low:.3g} to {volume.high:.3g}."]
    if not volume.prepared:
        if preprocessing is None:
            lines.append(
                "These are raw values (e.g. HU), and this model records no preprocessing: it reads prepared volumes only."
            )
        else:
            lines.append(f"Raw CT: the model reads it as in training, {preprocessing.describe()}.")
    if model_size is not None and tuple(model_size) != volume.shape:
        lines.append("The model reads it resized to " + " x ".join(str(n) for n in model_size) + ".")
    return " ".join(lines)


def user_message(action: str, callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` whose exceptions become a message: a user's error as it is, a bug as a short
    note (its traceback goes to the server log), so the page never shows a traceback."""

    def wrapped(*args: Any) -> Any:
        try:
            return callback(*args)
        except (UploadRejected, ValueError, FileNotFoundError) as error:
            return f"{action} failed: {error}"
        except Exception as error:  # noqa: BLE001 - the page gets a message, the log the traceback
            log.exception("%s failed", action)
            return f"{action} failed with an internal error ({type(error).__name__}); see the server log."

    return wrapped


class VolumeApp:
    """The app's callbacks (plain methods, tested without a browser) and their Gradio page."""

    def __init__(
        self,
        model: Any,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        max_new_tokens: int | None = None,
        texts: Sequence[str] | None = None,
        title: str = "med3dvlm",
    ) -> None:
        self.model = model
        self.max_upload_mb = float(max_upload_mb)
        self.max_new_tokens = max_new_tokens  # None: the model's default
        self.texts = list(texts or [])
        self.title = title

    @property
    def is_vlm(self) -> bool:
        return self.model.kind == "vlm"

    # -- callbacks --------------------------------------------------------------------------------
    def upload(self, path: str | None) -> tuple[Any, ...]:
        """``(volume or None, status, 3 slice images, 3 slider settings)`` after an upload or a clear."""
        try:
            volume = read_upload(path, self.max_upload_mb)
        except UploadRejected as error:
            return (None, str(error), None, None, None, *[slider_setting(1, 0)] * 3)
        except Exception as error:  # noqa: BLE001 - never a traceback on the page
            log.exception("reading the upload failed")
            return (None, f"Cannot read the upload ({type(error).__name__}); see the server log.",
                    None, None, None, *[slider_setting(1, 0)] * 3)  # fmt: skip
        middles = {plane: slice_count(volume, plane) // 2 for plane in PLANES}
        images = [slice_image(volume, plane, middles[plane]) for plane in PLANES]
        sliders = [slider_setting(slice_count(volume, plane), middles[plane]) for plane in PLANES]
        summary = volume_summary(volume, self.model.image_size, getattr(self.model, "preprocessing", None))
        return (volume, summary, *images, *sliders)

    def show_slice(self, volume: LoadedVolume | None, plane: str, index: float) -> np.ndarray | None:
        try:
            return slice_image(volume, plane, index)
        except Exception:  # noqa: BLE001 - an empty image, not a traceback
            log.exception("showing %s slice %s failed", plane, index)
            return None

    def slice_viewer(self, plane: str) -> Callable[[LoadedVolume | None, float], np.ndarray | None]:
        """The slider callback of one plane: ``(volume, index) -> image``."""

        def show(volume: LoadedVolume | None, index: float) -> np.ndarray | None:
            return self.show_slice(volume, plane, index)

        return show

    def ask(self, volume: LoadedVolume | None, question: str, texts: str = "") -> str:
        if volume is None:
            return NO_VOLUME
        question = (question or "").strip()
        if self.is_vlm:
            if not question:
                return "Type a question first (or press Describe for a report)."
            answer = self.model.ask(volume.array, question, max_new_tokens=self.max_new_tokens)
            return answer or "(the model answered with an empty text)"
        candidates = self._candidates(texts)
        if question and question not in candidates:
            candidates.append(question)
        return self._ranking(volume, candidates)

    def describe(self, volume: LoadedVolume | None, texts: str = "") -> str:
        if volume is None:
            return NO_VOLUME
        if self.is_vlm:
            report = self.model.describe(volume.array, max_new_tokens=self.max_new_tokens)
            return report or "(the model answered with an empty text)"
        return self._ranking(volume, self._candidates(texts))

    def _candidates(self, texts: str) -> list[str]:
        return [line.strip() for line in (texts or "").splitlines() if line.strip()]

    def _ranking(self, volume: LoadedVolume, candidates: list[str]) -> str:
        if not candidates:
            return (
                "This is a stage-1 (retrieval) model: it answers no questions but ranks texts by similarity "
                "to the volume. Write candidate texts, one per line, then press Ask or Describe."
            )
        matches = self.model.retrieve_texts(volume.array, candidates, k=len(candidates))
        header = f"{len(candidates)} texts ranked by cosine similarity to the volume:"
        return "\n".join([header] + [f"{rank}. {m.score:+.4f}  {m.label}" for rank, m in enumerate(matches, 1)])

    # -- the page ---------------------------------------------------------------------------------
    def build(self):
        """The Gradio ``Blocks`` of the app (element ids are what the browser test drives)."""
        import gradio as gr

        kind = "vision-language model" if self.is_vlm else "stage-1 (retrieval) model"
        with gr.Blocks(title=self.title, analytics_enabled=False) as page:
            gr.Markdown(f"# {self.title}\nA {kind}. Upload a volume, browse it, then ask.")
            volume = gr.State(None)
            with gr.Row():
                upload = gr.File(
                    label="Volume (.nii, .nii.gz, or a DICOM series .zip)", type="filepath", elem_id="upload", scale=1
                )
                status = gr.Markdown(NO_VOLUME, elem_id="status")
            images, sliders = [], []
            with gr.Row():
                for plane, (_, axes) in PLANES.items():
                    with gr.Column():
                        image = gr.Image(
                            label=f"{plane} ({axes})", format="png", height=280, interactive=False, buttons=[],
                            elem_id=f"{plane}-image",
                        )  # fmt: skip
                        slider = gr.Slider(0, 1, value=0, step=1, label=f"{plane} slice", elem_id=f"{plane}-slider")
                        images.append(image)
                        sliders.append(slider)
            question = gr.Textbox(
                label="Question" if self.is_vlm else "Text to rank (optional)",
                placeholder="e.g. Which organ has a lesion?" if self.is_vlm else "e.g. A lesion in the liver.",
                elem_id="question",
            )
            texts = gr.Textbox(
                label="Candidate texts, one per line",
                value="\n".join(self.texts),
                lines=5,
                visible=not self.is_vlm,
                elem_id="texts",
            )
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                describe = gr.Button("Describe", elem_id="describe")
            answer = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="answer")

            upload.change(self.upload, inputs=upload, outputs=[volume, status, *images, *sliders])
            for plane, image, slider in zip(PLANES, images, sliders):
                # .input (a user's move), not .change: the upload sets the sliders itself, and re-rendering
                # the slice it just showed would rewrite the image file while the browser reads it
                slider.input(self.slice_viewer(plane), inputs=[volume, slider], outputs=image, show_progress="hidden")
            ask_safely = user_message("Answering", self.ask)
            describe_safely = user_message("Describing", self.describe)
            ask.click(ask_safely, inputs=[volume, question, texts], outputs=answer)
            question.submit(ask_safely, inputs=[volume, question, texts], outputs=answer)
            describe.click(describe_safely, inputs=[volume, texts], outputs=answer)
        return page


def slider_setting(count: int, value: int):
    """A slider over ``count`` slices at ``value``."""
    import gradio as gr

    return gr.Slider(minimum=0, maximum=max(count - 1, 1), value=value, step=1, interactive=count > 1)


def launch(app: VolumeApp, host: str, port: int, **options: Any):
    """Starts the server (blocking unless ``prevent_thread_lock=True``); uploads above the limit
    are also refused by Gradio before they are written to disk."""
    page = app.build()
    return page.queue().launch(
        server_name=host,
        server_port=port,
        max_file_size=int(app.max_upload_mb * MEGABYTE),
        show_error=False,
        ssr_mode=False,
        **options,
    )
