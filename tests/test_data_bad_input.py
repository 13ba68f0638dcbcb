"""Every kind of bad input raises a typed DataError naming the file (and row); skip mode excludes."""

from __future__ import annotations

import contextlib
import json
import logging

import nibabel as nib
import numpy as np
import pytest

from med3dvlm.data import (
    CorruptFileError,
    DataError,
    InvalidRecordError,
    MissingColumnsError,
    MissingFileError,
    NonFiniteValuesError,
    UnknownFormatError,
    UnsafePathError,
    VolumeShapeError,
    VolumeTextDataset,
    collate_samples,
    layout,
    load_volume,
    read_cap_json,
    read_vqa_csv,
    read_vqa_yes_no_csv,
    save_volume,
)

GOOD_ROW = [
    "volumes/case0.nii.gz", "report", "1", "What plane is this?",
    "Axial", "Coronal", "Sagittal", "Oblique", "Axial", "A",
]  # fmt: skip


@contextlib.contextmanager
def raises_naming(error_type, *fragments):
    """The block raises ``error_type`` (a DataError, hence ValueError) naming every fragment."""
    with pytest.raises(error_type) as info:
        yield info
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------ volumes


def test_missing_volume(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with raises_naming(MissingFileError, path):
        load_volume(path)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.npy"])
def test_truncated_file(tmp_path, name):
    path = save_volume(np.random.default_rng(0).random((8, 16, 16), dtype=np.float32), tmp_path / name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with raises_naming(CorruptFileError, path):
        load_volume(path)


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.npy"])
def test_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(600))
    with raises_naming(CorruptFileError, path):
        load_volume(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "v.mha"
    path.write_bytes(b"x")
    with raises_naming(UnknownFormatError, path):
        load_volume(path)


@pytest.mark.parametrize("shape", [(16, 16), (2, 4, 5, 6), (1, 1, 4, 5, 6)])
def test_wrong_ndim_npy(tmp_path, shape):
    path = tmp_path / "v.npy"
    np.save(path, np.zeros(shape, dtype=np.float32))
    with raises_naming(VolumeShapeError, path, "shape"):
        load_volume(path)


def test_nifti_4d_with_several_volumes(tmp_path):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 2), dtype=np.float32), np.eye(4)), path)
    with raises_naming(VolumeShapeError, path):
        load_volume(path)


@pytest.mark.parametrize("bad_value, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
@pytest.mark.parametrize("suffix", [".nii.gz", ".npy"])
def test_non_finite_values(tmp_path, bad_value, word, suffix):
    volume = np.zeros((8, 16, 16), dtype=np.float32)
    volume[3, 4, 5] = bad_value
    path = save_volume(volume, tmp_path / f"v{suffix}")
    with raises_naming(NonFiniteValuesError, path, word):
        load_volume(path)


# ------------------------------------------------------------------ M3D-Cap JSON


def write_cap(root, entries, split="train"):
    root.mkdir(parents=True, exist_ok=True)
    (root / layout.CAP_JSON).write_text(json.dumps({split: entries}), encoding="utf-8")


def cap_case(root, name, report="A finding."):
    save_volume(np.zeros((8, 16, 16), dtype=np.float32), root / f"volumes/{name}.nii.gz")
    (root / "reports").mkdir(exist_ok=True)
    (root / f"reports/{name}.txt").write_text(report, encoding="utf-8")
    return {"image": f"volumes/{name}.nii.gz", "text": f"reports/{name}.txt"}


def test_cap_json_missing(tmp_path):
    with raises_naming(MissingFileError, tmp_path / layout.CAP_JSON):
        read_cap_json(tmp_path, "train")


def test_cap_json_malformed(tmp_path):
    (tmp_path / layout.CAP_JSON).write_text('{"train": [', encoding="utf-8")
    with raises_naming(CorruptFileError, tmp_path / layout.CAP_JSON, "line 1"):
        read_cap_json(tmp_path, "train")


def test_cap_json_missing_split(tmp_path):
    write_cap(tmp_path, [cap_case(tmp_path, "a")], split="train")
    with raises_naming(InvalidRecordError, tmp_path / layout.CAP_JSON, "test"):
        read_cap_json(tmp_path, "test")


def test_cap_entry_missing_key(tmp_path):
    write_cap(tmp_path, [{"image": cap_case(tmp_path, "a")["image"]}])
    with raises_naming(InvalidRecordError, tmp_path / layout.CAP_JSON, "train[0]", "text"):
        read_cap_json(tmp_path, "train")


def test_cap_report_missing(tmp_path):
    entry = cap_case(tmp_path, "a")
    (tmp_path / entry["text"]).unlink()
    write_cap(tmp_path, [entry])
    with raises_naming(MissingFileError, tmp_path / layout.CAP_JSON, "train[0]", entry["text"]):
        read_cap_json(tmp_path, "train")


def test_cap_empty_report(tmp_path):
    write_cap(tmp_path, [cap_case(tmp_path, "a", report=" \n\n  \n")])
    with raises_naming(InvalidRecordError, tmp_path / layout.CAP_JSON, "train[0]", "empty"):
        read_cap_json(tmp_path, "train")


@pytest.mark.parametrize("image", ["../outside.nii.gz", "volumes/../../outside.nii.gz", "/etc/volume.nii.gz"])
def test_cap_image_path_escaping_root(tmp_path, image):
    root = tmp_path / "root"
    entry = cap_case(root, "a")
    save_volume(np.zeros((8, 16, 16), dtype=np.float32), tmp_path / "outside.nii.gz")
    write_cap(root, [{**entry, "image": image}])
    with raises_naming(UnsafePathError, root / layout.CAP_JSON, image):
        read_cap_json(root, "train")


def test_cap_image_missing(tmp_path):
    entry = cap_case(tmp_path, "a")
    (tmp_path / entry["image"]).unlink()
    write_cap(tmp_path, [entry])
    with raises_naming(MissingFileError, tmp_path / layout.CAP_JSON, "train[0]", entry["image"]):
        read_cap_json(tmp_path, "train")


def test_cap_skip_excludes_exactly_the_bad_entries(tmp_path, caplog):
    good = [cap_case(tmp_path, name) for name in ("g0", "g1", "g2")]
    empty = cap_case(tmp_path, "empty", report="")
    entries = [good[0], empty, good[1], {"image": "../x.nii.gz", "text": good[2]["text"]}, good[2]]
    write_cap(tmp_path, entries)

    with caplog.at_level(logging.WARNING, logger="med3dvlm.data.m3d"):
        result = read_cap_json(tmp_path, "train", on_bad_sample="skip")

    assert [s.image_path for s in result.samples] == [tmp_path / e["image"] for e in good]
    assert [s.source for s in result.samples] == [f"M3D_Cap.json:train[{i}]" for i in (0, 2, 4)]
    assert [s.source for s in result.skipped] == [f"M3D_Cap.json:train[{i}]" for i in (1, 3)]
    assert "empty" in result.skipped[0].reason
    assert "skipped 2 bad sample(s) of 5" in caplog.text


def test_cap_skip_still_raises_for_a_broken_file(tmp_path):
    (tmp_path / layout.CAP_JSON).write_text("not json", encoding="utf-8")
    with pytest.raises(CorruptFileError):
        read_cap_json(tmp_path, "train", on_bad_sample="skip")


def test_unknown_policy_is_rejected(tiny_m3d_root):
    with pytest.raises(ValueError, match="on_bad_sample"):
        read_cap_json(tiny_m3d_root, "train", on_bad_sample="ignore")


# ------------------------------------------------------------------ M3D-VQA CSV


@pytest.fixture
def vqa_root(tmp_path):
    save_volume(np.zeros((8, 16, 16), dtype=np.float32), tmp_path / "volumes/case0.nii.gz")
    return tmp_path


def with_value(column, value, row=GOOD_ROW):
    changed = list(row)
    changed[layout.VQA_COLUMNS.index(column)] = value
    return changed


def test_csv_missing(vqa_root):
    path = vqa_root / "absent.csv"
    with raises_naming(MissingFileError, path):
        read_vqa_csv(path, vqa_root)


def test_csv_missing_columns(vqa_root, csv_writer):
    columns = [c for c in layout.VQA_COLUMNS if c not in ("Answer Choice", "Choice D")]
    path = csv_writer(vqa_root / "q.csv", columns, [GOOD_ROW[:8]])
    with raises_naming(MissingColumnsError, path, "row 1", "Answer Choice", "Choice D"):
        read_vqa_csv(path, vqa_root)
    with pytest.raises(MissingColumnsError):  # a file-level problem: skipping rows cannot fix it
        read_vqa_csv(path, vqa_root, on_bad_sample="skip")


@pytest.mark.parametrize("value", ["6", "0", "Spine", "", "1.5"])
def test_unknown_question_type(vqa_root, csv_writer, value):
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, [GOOD_ROW, with_value("Question Type", value)])
    with raises_naming(InvalidRecordError, path, "row 3", "Question Type"):
        read_vqa_csv(path, vqa_root)


@pytest.mark.parametrize("letter", ["E", "", "AB", "1"])
def test_answer_letter_outside_a_to_d(vqa_root, csv_writer, letter):
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, [with_value("Answer Choice", letter)])
    with raises_naming(InvalidRecordError, path, "row 2", "Answer Choice"):
        read_vqa_csv(path, vqa_root, "closed")


@pytest.mark.parametrize("column", ["Question", "Answer"])
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_empty_question_or_answer(vqa_root, csv_writer, column, mode):
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, [with_value(column, "  ")])
    with raises_naming(InvalidRecordError, path, "row 2", column):
        read_vqa_csv(path, vqa_root, mode)


@pytest.mark.parametrize("image", ["../case0.nii.gz", "/abs/case0.nii.gz"])
def test_csv_image_path_escaping_root(vqa_root, csv_writer, image):
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, [with_value("Image Path", image)])
    with raises_naming(UnsafePathError, path, "row 2", image):
        read_vqa_csv(path, vqa_root)


def test_csv_image_missing(vqa_root, csv_writer):
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, [with_value("Image Path", "volumes/none.npy")])
    with raises_naming(MissingFileError, path, "row 2", "volumes/none.npy"):
        read_vqa_csv(path, vqa_root)


def test_csv_row_with_wrong_field_count(vqa_root, csv_writer):
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, [GOOD_ROW + ["extra"]])
    with raises_naming(InvalidRecordError, path, "row 2", "fields"):
        read_vqa_csv(path, vqa_root)


def test_yes_no_answer_must_be_yes_or_no(vqa_root, csv_writer):
    row = ["volumes/case0.nii.gz", "report", "4", "Is there a lesion?", "Maybe"]
    path = csv_writer(vqa_root / "yn.csv", layout.VQA_YN_COLUMNS, [row])
    with raises_naming(InvalidRecordError, path, "row 2", "Maybe"):
        read_vqa_yes_no_csv(path, vqa_root)


def test_csv_skip_excludes_exactly_the_bad_rows(vqa_root, csv_writer, caplog):
    rows = [
        with_value("Question", "Q row 2"),
        with_value("Question Type", "9"),
        with_value("Question", "Q row 4"),
        with_value("Answer Choice", "E"),
        with_value("Image Path", "volumes/none.nii.gz"),
        with_value("Question", "Q row 7"),
    ]
    path = csv_writer(vqa_root / "q.csv", layout.VQA_COLUMNS, rows)

    with caplog.at_level(logging.WARNING, logger="med3dvlm.data.m3d"):
        result = read_vqa_csv(path, vqa_root, "closed", on_bad_sample="skip")

    assert [s.source for s in result.samples] == ["q.csv:row 2", "q.csv:row 4", "q.csv:row 7"]
    assert [s.prompt.split(" Choices")[0] for s in result.samples] == ["Q row 2", "Q row 4", "Q row 7"]
    assert [s.source for s in result.skipped] == ["q.csv:row 3", "q.csv:row 5", "q.csv:row 6"]
    assert "skipped 3 bad sample(s) of 6" in caplog.text


# ------------------------------------------------------------------ volumes at dataset time


def test_dataset_names_file_and_source_or_skips(tmp_path, caplog):
    from med3dvlm.data import Sample

    good = save_volume(np.ones((8, 16, 16), dtype=np.float32), tmp_path / "good.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume")
    samples = [
        Sample(image_path=good, prompt="p", answer="a", task="caption", source="M3D_Cap.json:train[0]"),
        Sample(image_path=bad, prompt="p", answer="a", task="caption", source="M3D_Cap.json:train[1]"),
    ]

    with raises_naming(CorruptFileError, bad, "M3D_Cap.json:train[1]"):
        VolumeTextDataset(samples)[1]

    dataset = VolumeTextDataset(samples, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="med3dvlm.data.datamodules"):
        items = [dataset[0], dataset[1]]
    assert items[1] is None and dataset.skipped == 1
    assert "M3D_Cap.json:train[1]" in caplog.text
    batch = collate_samples(items)
    assert batch["source"] == ["M3D_Cap.json:train[0]"]
    assert batch["image"].shape == (1, 1, 8, 16, 16)
    assert collate_samples([None, None]) is None
