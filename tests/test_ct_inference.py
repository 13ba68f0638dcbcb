"""Raw CT through every entry point: one preprocessing from ``prepare`` to ``load_model``, the demo,
the app and ``data.check``, on DICOM series, their zip and HU NIfTI written by ``tests/ct_files.py``.

References: the prepared phantom itself (a phantom written as HU must come back as the same model
input), and ``prepare`` + reading the prepared volume (what training saw) for a windowed, cropped CT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from ct_files import PATIENT_MARKERS, phantom_hu, write_dicom_series, write_hu_nifti, zip_folder
from tiny_models import PHANTOM_SHAPE

import med3dvlm
from med3dvlm.data.preprocessing import PREPROCESSING_FILE, Preprocessing, read_preprocessing
from med3dvlm.data.volumes import load_volume

SPACING = (2.0, 0.8, 0.8)


def assert_no_patient_data(*texts: str) -> None:
    for value in PATIENT_MARKERS.values():
        for text in texts:
            assert value not in text, f"{value!r} leaked"


@pytest.fixture(scope="module")
def raw_phantom(tiny_models, tmp_path_factory):
    """The first tiny-model phantom as a DICOM folder, its zip and a HU NIfTI."""
    root = tmp_path_factory.mktemp("raw_phantom")
    hu = phantom_hu(load_volume(tiny_models.volumes[0]))
    folder = root / "series"
    write_dicom_series(hu, folder, SPACING)
    return {
        "prepared": tiny_models.volumes[0],
        "dicom": folder,
        "zip": zip_folder(folder, root / "series.zip"),
        "nifti": write_hu_nifti(hu, root / "scan.nii.gz", SPACING),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_export_records_the_training_preprocessing(tiny_models):
    from med3dvlm.data.phantoms import phantom_preprocessing

    assert read_preprocessing(tiny_models.clip_dir) == phantom_preprocessing(PHANTOM_SHAPE)
    assert med3dvlm.load_model(tiny_models.clip_checkpoint).preprocessing == phantom_preprocessing(PHANTOM_SHAPE)


def test_dicom_folder_zip_and_hu_nifti_give_the_phantom_embedding(tiny_models, raw_phantom):
    clip = med3dvlm.load_model(tiny_models.clip_dir)
    reference = clip.embed_image(raw_phantom["prepared"])
    for kind in ("dicom", "zip", "nifti"):
        embedding = clip.embed_image(raw_phantom[kind])
        assert cosine(embedding, reference) >= 0.999, kind
        torch.testing.assert_close(embedding, reference, rtol=1e-4, atol=1e-4)
    vlm = med3dvlm.load_model(tiny_models.vlm_dir)
    tokens = vlm.embed_image(raw_phantom["prepared"])
    assert cosine(vlm.embed_image(raw_phantom["dicom"]), tokens) >= 0.999
    assert cosine(vlm.embed_image(raw_phantom["zip"]), tokens) >= 0.999


def test_raw_input_without_a_recorded_preprocessing_is_refused(tiny_models, raw_phantom, tmp_path):
    bare = shutil.copytree(tiny_models.clip_dir, tmp_path / "bare")
    (bare / PREPROCESSING_FILE).unlink()
    clip = med3dvlm.load_model(bare)
    with pytest.raises(ValueError, match="raw input .* records no preprocessing"):
        clip.embed_image(raw_phantom["dicom"])
    clip.embed_image(raw_phantom["prepared"])  # prepared volumes still pass
    told = med3dvlm.load_model(bare, preprocessing=Preprocessing((-1000, 1000), False, PHANTOM_SHAPE))
    torch.testing.assert_close(told.embed_image(raw_phantom["nifti"]), clip.embed_image(raw_phantom["prepared"]),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# prepare == inference, on a windowed and cropped CT
# ----------------------------------------------------------------------------------------------


def body_ct(shape=(14, 28, 30), seed=0) -> np.ndarray:
    """Integer HU: air around an elliptic body of soft tissue with a bone and a lesion."""
    rng = np.random.default_rng(seed)
    d, h, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = np.full(shape, -1000.0, np.float32)
    volume[(h / 0.7) ** 2 + (w / 0.8) ** 2 < 1] = 40.0
    volume[(h / 0.2) ** 2 + ((w - 0.2) / 0.2) ** 2 < 1] = 700.0
    volume[(d**2 + (h + 0.3) ** 2 + (w + 0.3) ** 2) < 0.1] = -60.0
    return np.rint(volume + rng.normal(0, 15, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def prepared_tree(tmp_path_factory):
    """A raw tree (a DICOM study with two series, the same CT as HU NIfTI, a tilted study with its
    report in a CSV) and its preparation at 12 x 16 x 16."""
    from med3dvlm.data.prepare import PrepareSettings, prepare_dataset

    base = tmp_path_factory.mktemp("dicom_tree")
    raw = base / "raw"
    ct = body_ct()
    write_dicom_series(ct, raw / "study_a" / "DICOM" / "S2", SPACING, series_number=2, description="AXIAL SOFT", seed=1)
    write_dicom_series(ct[::-1].copy(), raw / "study_a" / "DICOM" / "S5", SPACING, series_number=5,
                       description="AXIAL REVERSED", seed=2)  # fmt: skip
    (raw / "study_a" / "text.txt").write_text("study_findings: Lesion in the left lobe.", encoding="utf-8")
    (raw / "study_b").mkdir(parents=True)
    write_hu_nifti(ct, raw / "study_b" / "scan.nii.gz", SPACING)
    (raw / "study_b" / "text.txt").write_text("study_findings: Same scan as NIfTI.", encoding="utf-8")
    write_dicom_series(ct, raw / "study_c", SPACING, tilt_degrees=12.0, seed=3)
    reports = base / "reports.csv"
    reports.write_text('case,report\nstudy_c,"Tilted head CT,\nno acute findings."\nstudy_z,Not in raw_dir.\n')
    settings = PrepareSettings(shape=(12, 16, 16))
    out = base / "out"
    summary = prepare_dataset(raw, out, settings, workers=1, progress=False, reports_csv=reports)
    return raw, out, summary, ct, settings


def test_prepare_reads_dicom_studies_one_series_each(prepared_tree):
    raw, out, summary, ct, settings = prepared_tree
    status = {r.key: r.status for r in summary.results}
    assert status == {"ct_case/study_a": "prepared", "ct_case/study_b": "prepared", "ct_case/study_c": "failed"}
    failure = next(r.reason for r in summary.results if r.key == "ct_case/study_c")
    assert "gantry tilt of 12.0 degrees" in failure
    assert any("1 case(s) without a folder" in note for note in summary.notes)  # study_z of the CSV
    soft = load_volume(out / "ct_case/study_a/2_AXIAL_SOFT.nii.gz")
    reversed_ = load_volume(out / "ct_case/study_a/5_AXIAL_REVERSED.nii.gz")
    nifti = load_volume(out / "ct_case/study_b/scan.nii.gz")
    np.testing.assert_allclose(soft, nifti, atol=1e-6)  # DICOM and NIfTI of one CT: one prepared volume
    np.testing.assert_allclose(reversed_, soft[:, ::-1], atol=1e-6)
    expected = settings.preprocessing("dicom").apply(ct)  # the shared definition, applied by hand
    np.testing.assert_allclose(soft[0], expected, atol=1e-6)
    assert (out / "ct_case/study_a/text.txt").read_text(encoding="utf-8") == "Lesion in the left lobe.\n"
    assert read_preprocessing(out) == settings.preprocessing("dicom")
    rerun = __import__("med3dvlm.data.prepare", fromlist=["prepare_dataset"]).prepare_dataset(
        raw, out, settings, workers=1, progress=False
    )
    assert {r.key: r.status for r in rerun.results}["ct_case/study_a"] == "skipped"


def test_the_tilted_study_gets_its_report_from_the_csv(tmp_path):
    from med3dvlm.data.prepare import PrepareSettings, prepare_dataset

    raw = tmp_path / "raw"
    write_dicom_series(body_ct(), raw / "study_c", SPACING, seed=3)
    reports = tmp_path / "reports.csv"
    reports.write_text('case,report\nstudy_c,"Head CT,\nno acute findings."\n')
    prepare_dataset(raw, tmp_path / "out", PrepareSettings(shape=(8, 8, 8)), workers=1, progress=False,
                    reports_csv=reports)  # fmt: skip
    assert (tmp_path / "out/ct_case/study_c/text.txt").read_text(encoding="utf-8") == "Head CT, no acute findings.\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("case,report\nstudy_c,\n")
    from med3dvlm.data.prepare import PreparationError

    with pytest.raises(PreparationError, match="bad.csv row 2: empty report"):
        prepare_dataset(raw, tmp_path / "out2", PrepareSettings(shape=(8, 8, 8)), workers=1, reports_csv=bad)


def test_prepared_outputs_hold_no_patient_data(prepared_tree):
    _, out, summary, _, _ = prepared_tree
    texts = [summary.text(), json.dumps(summary.to_json())]
    for path in out.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    assert_no_patient_data(*texts)


def test_inference_feeds_the_model_what_prepare_wrote(prepared_tree):
    """``ask(raw)`` sees the tensor that ``prepare`` + reading the prepared volume gives (SPEC §6 pipeline)."""
    from med3dvlm.api import model_input

    raw, out, _, _, settings = prepared_tree
    preprocessing = read_preprocessing(out)
    size = (12, 16, 16)
    from_prepared = model_input(out / "ct_case/study_b/scan.nii.gz", size)
    for source in (raw / "study_b/scan.nii.gz", raw / "study_a/DICOM/S2"):
        torch.testing.assert_close(model_input(source, size, preprocessing), from_prepared, rtol=0, atol=1e-6)
    fast = model_input(out / "ct_case/study_b/scan.nii", size)  # the uint8 copy training reads by default
    assert float((fast - model_input(raw / "study_b/scan.nii.gz", size, preprocessing)).abs().max()) <= 0.5 / 255 + 1e-6


# ----------------------------------------------------------------------------------------------
# Demo, app, data.check
# ----------------------------------------------------------------------------------------------


def test_demo_answers_on_a_dicom_folder(tiny_models, raw_phantom, capsys):
    from med3dvlm.demo import main

    assert main([f"model_dir={tiny_models.vlm_dir}", f"image={raw_phantom['dicom']}", "max_new_tokens=6"]) == 0
    from_dicom = capsys.readouterr()
    assert from_dicom.out.startswith("report: ")
    assert main([f"model_dir={tiny_models.vlm_dir}", f"image={raw_phantom['prepared']}", "max_new_tokens=6"]) == 0
    assert capsys.readouterr().out == from_dicom.out  # the same input tensor, the same greedy report
    assert_no_patient_data(from_dicom.out, from_dicom.err)


def test_demo_names_the_series_of_a_mixed_folder(tiny_models, tmp_path, capsys):
    from med3dvlm.demo import main

    write_dicom_series(body_ct(), tmp_path / "mixed", SPACING, series_number=3, seed=1)
    write_dicom_series(body_ct(seed=1), tmp_path / "mixed", SPACING, series_number=4, seed=2)
    assert main([f"model_dir={tiny_models.clip_dir}", f"image={tmp_path / 'mixed'}", "texts=a|b"]) == 2
    err = capsys.readouterr().err
    assert "2 image series" in err and "number 3" in err and "number 4" in err and "series=" in err
    assert_no_patient_data(err)


def test_app_reads_a_zipped_dicom_series(tiny_models, raw_phantom, tmp_path):
    from med3dvlm.webui import VolumeApp

    clip = med3dvlm.load_model(tiny_models.clip_dir)
    app = VolumeApp(clip)
    volume, status, *_ = app.upload(str(raw_phantom["zip"]))
    assert volume is not None and not volume.prepared, status
    assert "Raw CT: the model reads it as in training, HU window [-1000, 1000]" in status
    assert_no_patient_data(status)
    ranking = app.ask(volume, "", "Liver lesion.\nNo lesion.")
    expected = clip.retrieve_texts(raw_phantom["prepared"], ["Liver lesion.", "No lesion."], k=2)
    assert ranking.splitlines()[1].endswith(expected[0].label)
    write_dicom_series(body_ct(), tmp_path / "two" / "a", SPACING, seed=1)
    write_dicom_series(body_ct(), tmp_path / "two" / "b", SPACING, seed=2, series_number=9)
    volume, status, *_ = app.upload(str(zip_folder(tmp_path / "two", tmp_path / "two.zip")))
    assert volume is None and status.startswith("Cannot read two.zip") and "2 image series" in status
    assert str(tmp_path) not in status  # the server's upload folder is not shown


def test_data_check_lists_each_series_of_a_raw_study(tmp_path):
    from med3dvlm.data.check import check_ct

    study = tmp_path / "study"
    write_dicom_series(body_ct(), study / "S2", SPACING, series_number=2, description="AXIAL SOFT", seed=1)
    files = write_dicom_series(body_ct(), study / "S3", SPACING, series_number=3, description="GAPPY", seed=2)
    files[6].unlink()
    report = check_ct(study)
    text = report.text()
    assert report.volumes == 1 and report.exit_code == 1
    assert "'AXIAL SOFT', 14 slices): 14 x 28 x 30 voxels (D x H x W), spacing 2 x 0.8 x 0.8 mm" in text
    assert any("a slice is missing" in p.message and files[5].name in p.message for p in report.problems)
    assert_no_patient_data(text)
    command = [sys.executable, "-m", "med3dvlm.check", f"ct={study}", "series=2", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "AXIAL SOFT" in done.stdout and "GAPPY" not in done.stdout and "no problems found" in done.stdout
    assert_no_patient_data(done.stdout, done.stderr, (tmp_path / "run" / "check_report.json").read_text())


def test_a_compressed_nifti_is_decoded_once_and_read_as_before(raw_phantom, tiny_models, monkeypatch):
    """``.nii.gz`` input is decompressed once (it bounds batch inference), and still comes out as
    ``load_ct`` gives raw CT and ``load_volume`` gives a prepared volume."""
    from med3dvlm.api import read_input
    from med3dvlm.data import volumes
    from med3dvlm.data.ct import load_ct

    expected_raw = load_ct(raw_phantom["nifti"]).volume
    expected_prepared = load_volume(raw_phantom["prepared"])
    calls = []
    real_gunzip = volumes._gunzip
    monkeypatch.setattr(volumes, "_gunzip", lambda data: calls.append(len(data)) or real_gunzip(data))
    raw = read_input(raw_phantom["nifti"])
    assert len(calls) == 1 and not raw.prepared
    np.testing.assert_array_equal(raw.array[0], expected_raw)
    prepared = read_input(raw_phantom["prepared"])
    assert len(calls) == 2 and prepared.prepared
    np.testing.assert_array_equal(prepared.array, expected_prepared)
