"""The Gradio app's callbacks, without a browser: refusals with a message, slices, answers.

The browser drives the same callbacks end to end in ``test_app_browser.py`` (slow).
"""

from __future__ import annotations

import numpy as np
import pytest

import med3dvlm
from med3dvlm.app import main
from med3dvlm.data.volumes import load_volume
from med3dvlm.webui import NO_VOLUME, VolumeApp, slice_image, user_message

pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def vlm_app(tiny_models):
    return VolumeApp(med3dvlm.load_model(tiny_models.vlm_dir), max_upload_mb=1, max_new_tokens=8)


@pytest.fixture(scope="module")
def clip_app(tiny_models):
    return VolumeApp(med3dvlm.load_model(tiny_models.clip_dir), texts=["A lesion in the liver."])


def refusals(tmp_path, volume):
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    (tmp_path / "flat.nii").write_bytes(b"\0" * 100)
    big = tmp_path / "big.nii.gz"
    big.write_bytes(volume.read_bytes() + b"\0" * (1024 * 1024))  # over the 1 MB limit of vlm_app
    return [
        (None, "Upload a NIfTI volume"),
        (tmp_path / "notes.txt", "notes.txt is neither NIfTI nor a zip"),
        (tmp_path / "broken.nii.gz", "Cannot read broken.nii.gz"),
        (tmp_path / "flat.nii", "Cannot read flat.nii"),
        (big, "big.nii.gz is 1.0 MB, above this app's limit of 1 MB"),
    ]


def test_refused_uploads_give_a_message_and_no_volume(vlm_app, tiny_models, tmp_path):
    for path, message in refusals(tmp_path, tiny_models.volumes[0]):
        outputs = vlm_app.upload(None if path is None else str(path))
        volume, status, *images = outputs[:5]
        assert volume is None and images == [None, None, None]
        assert message in status, status
        assert str(tmp_path) not in status  # the server's upload folder is not shown
        assert "Traceback" not in status


def test_upload_shows_the_middle_slices_and_sets_the_sliders(vlm_app, tiny_models):
    path = tiny_models.volumes[0]
    volume, status, axial, coronal, sagittal, *sliders = vlm_app.upload(str(path))
    array = load_volume(path)[0]  # (D, H, W) = (16, 32, 32)
    assert volume.shape == (16, 32, 32)
    assert "16 x 32 x 32 voxels" in status
    assert [(s.maximum, s.value) for s in sliders] == [(15, 8), (31, 16), (31, 16)]
    # 8-bit, scaled by the volume's range, enlarged 16x (32 -> DISPLAY_SIZE 256) or 8x (16 -> 128)
    low, high = array.min(), array.max()
    expected_axial = np.rint((array[8] - low) / (high - low) * 255).astype(np.uint8)
    assert axial.shape == (256, 256) and axial.dtype == np.uint8
    assert np.array_equal(axial[::8, ::8], expected_axial)
    assert coronal.shape == (128, 256)
    assert np.array_equal(coronal[::8, ::8], slice_image(volume, "coronal", 16)[::8, ::8])
    assert np.array_equal(sagittal[::8, ::8], np.rint((array[:, :, 16] - low) / (high - low) * 255).astype(np.uint8))
    # a slider move shows another slice; out-of-range indices are clamped
    assert not np.array_equal(vlm_app.show_slice(volume, "axial", 4), axial)
    assert np.array_equal(vlm_app.show_slice(volume, "axial", 99), vlm_app.show_slice(volume, "axial", 15))
    assert vlm_app.show_slice(None, "axial", 3) is None


def test_ask_and_describe_give_the_api_answers(vlm_app, tiny_models):
    volume = vlm_app.upload(str(tiny_models.volumes[1]))[0]
    model = vlm_app.model
    question = "Which organ has a lesion?"
    assert vlm_app.ask(volume, question) == model.ask(tiny_models.volumes[1], question, max_new_tokens=8)
    assert vlm_app.describe(volume) == model.describe(tiny_models.volumes[1], max_new_tokens=8)
    assert vlm_app.ask(None, question) == NO_VOLUME
    assert vlm_app.describe(None) == NO_VOLUME
    assert "Type a question" in vlm_app.ask(volume, "  ")


def test_stage1_app_ranks_the_candidate_texts(clip_app, tiny_models):
    volume = clip_app.upload(str(tiny_models.volumes[2]))[0]
    texts = "\n".join(tiny_models.reports[:2]) + "\n\n"
    ranking = clip_app.ask(volume, "A normal abdomen.", texts).splitlines()
    candidates = tiny_models.reports[:2] + ["A normal abdomen."]
    matches = clip_app.model.retrieve_texts(tiny_models.volumes[2], candidates, k=3)
    assert ranking[0] == "3 texts ranked by cosine similarity to the volume:"
    assert ranking[1:] == [f"{rank}. {m.score:+.4f}  {m.label}" for rank, m in enumerate(matches, 1)]
    assert "answers no questions" in clip_app.describe(volume, "")


def test_errors_in_callbacks_become_messages(caplog):
    def broken(*_):
        raise RuntimeError("boom")

    def refused(*_):
        raise ValueError("choices must be four answers")

    assert user_message("Answering", refused)() == "Answering failed: choices must be four answers"
    message = user_message("Answering", broken)()
    assert message == "Answering failed with an internal error (RuntimeError); see the server log."
    assert "boom" in caplog.text  # the traceback goes to the log


def test_page_has_the_viewer_and_the_question_box(vlm_app, clip_app):
    for app, texts_visible in ((vlm_app, False), (clip_app, True)):
        config = app.build().config
        by_id = {c["props"].get("elem_id"): c for c in config["components"] if c["props"].get("elem_id")}
        expected = {"upload", "status", "question", "texts", "ask", "describe", "answer"}
        expected |= {f"{plane}-{part}" for plane in ("axial", "coronal", "sagittal") for part in ("image", "slider")}
        assert expected <= set(by_id)
        assert by_id["texts"]["props"]["visible"] is texts_visible


def test_command_line_refuses_bad_settings_before_starting(capsys, tmp_path):
    assert main(["model_dir=x", "port=eighty"]) == 2
    assert "port='eighty'" in capsys.readouterr().err
    assert main([f"model_dir={tmp_path}"]) == 2
    assert "holds neither" in capsys.readouterr().err


def test_command_line_binds_to_localhost_by_default(tiny_models, monkeypatch, tmp_path):
    import med3dvlm.app

    started = {}
    monkeypatch.setattr(med3dvlm.app, "launch", lambda app, host, port: started.update(app=app, host=host, port=port))
    (tmp_path / "texts.txt").write_text("A lesion in the liver.\nNo abnormality.\n")
    assert main([f"model_dir={tiny_models.clip_dir}", f"texts=@{tmp_path / 'texts.txt'}"]) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 7860)
    assert started["app"].max_upload_mb == 512 and started["app"].model.kind == "retrieval"
    assert started["app"].texts == ["A lesion in the liver.", "No abnormality."]
    assert main([f"model_dir={tiny_models.clip_dir}", "host=0.0.0.0", "port=8080", "max_upload_mb=2"]) == 0
    assert (started["host"], started["port"], started["app"].max_upload_mb) == ("0.0.0.0", 8080, 2)
