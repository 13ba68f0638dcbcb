"""CT-RATE and 3D-RAD as downloaded -> the prepared root -> readers, check, stages and evaluation.

The trees are written by ``tests/ct_rate_files.py`` from phantoms in HU, once with raw stored values
(the first CT-RATE release) and once in HU (the second). References: the HU volumes and labels the
trees were written from, and the patient ids in the file names.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ct_rate_files import PATIENTS, SHAPE, write_ct_rate_tree

from med3dvlm.data import layout
from med3dvlm.data.ct_rate import ABNORMALITY_LABELS, RAD3D_TASKS, patient_of, read_abnormality_labels
from med3dvlm.data.prepare import CT_RATE_HU_WINDOW, PrepareSettings, prepare_ct_rate
from med3dvlm.data.volumes import load_volume

MISSING = ("train_6_a_1.nii.gz",)  # listed in the CSVs, not downloaded


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("ct_rate")
    settings = PrepareSettings(shape=SHAPE, hu_window=CT_RATE_HU_WINDOW, cases_dir="ct_rate")
    out = {}
    for storage in ("stored", "hu"):
        tree = write_ct_rate_tree(base / f"raw_{storage}", base / f"phantoms_{storage}", storage, missing=MISSING)
        summary = prepare_ct_rate(tree.root, base / f"out_{storage}", settings, rad3d_dir=tree.rad3d,
                                  workers=1, progress=False)  # fmt: skip
        out[storage] = (tree, base / f"out_{storage}", summary)
    return out


def cap_entries(root: Path) -> dict[str, list[dict]]:
    return json.loads((root / layout.CAP_JSON).read_text())


def test_both_storage_versions_prepare_to_the_same_volumes(trees):
    (_, stored_root, stored), (tree, hu_root, hu) = trees["stored"], trees["hu"]
    assert stored.exit_code == 0 and hu.exit_code == 0, stored.text()
    assert "voxels as found: 15 as stored values (rescaled)" in stored.text()
    assert "voxels as found: 15 in HU" in hu.text()
    volumes = sorted((stored_root / "ct_rate").rglob("*.nii.gz"))
    assert len(volumes) == len(tree.volumes) - len(MISSING) == 15
    for path in volumes:
        np.testing.assert_array_equal(load_volume(path), load_volume(hu_root / path.relative_to(stored_root)))
    # and they are the HU volumes through the CT-RATE window, cropped, resized (here: the phantom size)
    name = "valid_2_a_1.nii.gz"
    from med3dvlm.data.preprocessing import Preprocessing

    expected = Preprocessing(CT_RATE_HU_WINDOW, True, SHAPE).apply(tree.volumes[name])
    np.testing.assert_allclose(load_volume(hu_root / "ct_rate/valid_2_a_1/valid_2_a_1.nii.gz")[0], expected, atol=1e-6)


def test_a_patient_never_lands_in_two_splits(trees):
    _, root, summary = trees["hu"]
    split_of_patient: dict[str, set[str]] = {}
    for split, entries in cap_entries(root).items():
        for entry in entries:
            split_of_patient.setdefault(patient_of(Path(entry["image"]).name), set()).add(split)
    assert all(len(splits) == 1 for splits in split_of_patient.values()), split_of_patient
    assert {p for p, s in split_of_patient.items() if s == {"train"}} == {
        p for p in PATIENTS if p.startswith("train")
    } - {"train_6"}
    valid = {p: s.pop() for p, s in split_of_patient.items() if p.startswith("valid")}
    assert set(valid.values()) == {"validation", "test"}  # both carved from valid, by patient
    assert any("1 volume(s) listed in the reports but not under raw_dir" in note for note in summary.notes)
    # the reports are findings + impressions
    entry = cap_entries(root)["train"][0]
    assert (root / entry["text"]).read_text().rstrip().endswith("No acute findings.")


def test_labels_and_3d_rad_questions_follow_their_volumes(trees):
    tree, root, _ = trees["hu"]
    split_of_image = {e["image"]: split for split, entries in cap_entries(root).items() for e in entries}
    for split in layout.CAP_SPLITS:
        labelled = read_abnormality_labels(root, split)
        assert labelled, split
        for volume in labelled:
            assert split_of_image[str(volume.image_path.relative_to(root))] == split
            assert volume.labels == tree.labels[volume.volume_name]
    from med3dvlm.data.tasks import read_task_split

    closed = read_task_split(root, "vqa_closed", "test").samples
    assert {s.question_type for s in closed} == set(RAD3D_TASKS.values())
    two = next(s for s in closed if s.question_type == "Anomaly Detection")
    assert two.prompt.endswith("\nChoices: A. Yes B. No\nAnswer:") and two.answer in ("A. Yes", "B. No")
    four = next(s for s in closed if s.question_type == "Image Observation")
    assert "\nChoices: A. left lobe B. right lobe C. both lobes D. none\nAnswer:" in four.prompt
    assert four.aspect == "location" and dict(four.choices)["C"] == "both lobes"
    assert all(split_of_image[str(s.image_path.relative_to(root))] == "test" for s in closed)
    opened = read_task_split(root, "vqa_open", "train").samples
    assert opened and all(s.task == "vqa_open" and s.aspect == "finding" for s in opened)
    assert read_task_split(root, "vqa_yes_no", "train").samples == []


def test_data_check_reads_a_prepared_ct_rate_root(trees, tmp_path):
    import shutil

    from med3dvlm.data.check import check_dataset

    _, root, _ = trees["hu"]
    report = check_dataset(root, shape=SHAPE, workers=1)
    assert report.exit_code == 0, report.text()
    assert any("3D-RAD/test/task1_closed.csv" in f for f in report.files)
    assert any("CT-RATE-labels/test.csv" in f for f in report.files)
    broken = shutil.copytree(root, tmp_path / "broken")
    table = broken / "3D-RAD/train/task2_closed.csv"
    rows = list(csv.reader(table.open()))
    rows[2][-1] = "E"  # an answer letter outside the choices
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    labels = broken / "CT-RATE-labels/train.csv"
    text = labels.read_text().splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + ",maybe"
    labels.write_text("\n".join(text) + "\n")
    problems = [p.message for p in check_dataset(broken, shape=SHAPE, workers=1).problems]
    assert any("task2_closed.csv: row 3" in p and "AnswerChoice" in p for p in problems), problems
    assert any("train.csv: row 2" in p and "expected 0 or 1" in p for p in problems), problems


def test_rerun_skips_what_is_done_and_the_command_line_runs(trees, tmp_path):
    tree, root, _ = trees["stored"]
    command = [
        sys.executable, "-m", "med3dvlm.prepare", "source=ct_rate", f"raw_dir={tree.root}", f"out_dir={root}",
        f"rad3d_dir={tree.rad3d}", f"shape=[{','.join(map(str, SHAPE))}]", "cases_dir=ct_rate", "workers=1",
        "progress=false", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "15 cases: 0 done, 15 skipped (done before), 0 failed" in done.stdout
    assert json.loads((root / "preprocessing.json").read_text())["hu_window"] == list(CT_RATE_HU_WINDOW)


def test_stored_values_without_metadata_are_refused_per_volume(tmp_path):
    tree = write_ct_rate_tree(tmp_path / "raw", tmp_path / "phantoms", "stored")
    meta = tree.root / "dataset/metadata/train_metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(line for line in lines if not line.startswith("train_2_a_1")) + "\n")
    summary = prepare_ct_rate(tree.root, tmp_path / "out", PrepareSettings(shape=(8, 8, 8)), workers=1, progress=False)
    failed = {r.key: r.reason for r in summary.results if r.status == "failed"}
    assert list(failed) == ["ct_case/train_2_a_1"]
    assert "holds stored values" in failed["ct_case/train_2_a_1"] and "RescaleSlope" in failed["ct_case/train_2_a_1"]
    assert summary.exit_code == 1


def test_label_columns_are_ct_rates_eighteen():
    assert len(ABNORMALITY_LABELS) == 18 and len(set(ABNORMALITY_LABELS)) == 18
    assert {"Emphysema", "Atelectasis", "Lung nodule", "Pleural effusion", "Cardiomegaly"} <= set(ABNORMALITY_LABELS)


def test_stages_and_vqa_evaluation_run_on_the_prepared_root(trees, tmp_path):
    """The fixture path end to end: stage 1 (data=ct_rate_cap), stages 2-3 (data=rad3d_vqa), export,
    and 3D-RAD VQA evaluation with tables by task and by QuestionAspect."""
    from hydra_helpers import CPU_TINY, compose_config, small_llm
    from omegaconf import open_dict

    from med3dvlm.checkpoints.export import export_checkpoint
    from med3dvlm.data.preprocessing import Preprocessing, read_preprocessing
    from med3dvlm.evaluation.evaluator import evaluate
    from med3dvlm.train import train

    _, root, _ = trees["hu"]
    size = f"[{','.join(map(str, SHAPE))}]"

    def config(run, experiment, data, *overrides):
        cfg = compose_config("train", [f"experiment={experiment}", "debug=tiny", f"data={data}", *CPU_TINY,
                                       "callbacks.model_checkpoint.monitor=null", "trainer.limit_train_batches=1",
                                       "trainer.limit_val_batches=1", "data.datamodule.num_workers=0", *overrides],
                             tmp_path / run)  # fmt: skip
        with open_dict(cfg):
            cfg.data.datamodule.root = str(root)
            del cfg["hydra"]
        return cfg

    siglip = config("siglip", "siglip", "ct_rate_cap", f"data.datamodule.spatial_size={size}", "test=false")
    train(siglip)
    siglip_run = Path(siglip.paths.output_dir)
    _, exported = export_checkpoint(siglip_run / "checkpoints/last.ckpt", tmp_path / "siglip_export")
    assert read_preprocessing(exported) == Preprocessing(CT_RATE_HU_WINDOW, True, SHAPE)
    zero_shot = compose_config(
        "eval", ["eval=zero_shot", f"model_dir={exported}", f"data_root={root}"], tmp_path / "zs"
    )
    evaluate(zero_shot)
    zs_summary = json.loads((Path(zero_shot.paths.output_dir) / "zero_shot_summary.json").read_text())
    assert zs_summary["num_volumes"] == len(read_abnormality_labels(root, "test"))

    llm = small_llm(layers=1)
    pretrain = config("pretrain", "pretrain", "rad3d_vqa", f"data.image_size={size}", f"encoder.pretrained={siglip_run / 'image_encoder'}",
                      "test=false", *llm)  # fmt: skip
    train(pretrain)
    pretrain_run = Path(pretrain.paths.output_dir)
    finetune = config("finetune", "finetune", "rad3d_vqa", f"data.image_size={size}", f"encoder.pretrained={pretrain_run / 'image_encoder'}",
                      f"model.projector_path={pretrain_run / 'projector'}", *llm)  # fmt: skip
    train(finetune)
    finetune_run = Path(finetune.paths.output_dir)
    accuracy = json.loads((finetune_run / "vqa_closed.json").read_text())["accuracy"]
    tasks = set(accuracy) - {"overall"}
    assert tasks and tasks <= set(RAD3D_TASKS.values())  # the stage's own test scores by 3D-RAD task
    _, vlm_dir = export_checkpoint(finetune_run / "checkpoints/last.ckpt", tmp_path / "vlm_export")

    eval_cfg = compose_config("eval", ["eval=vqa_closed", f"model_dir={vlm_dir}", f"data_root={root}",
                                       "eval.limit=12", "accelerator=cpu"], tmp_path / "eval")  # fmt: skip
    evaluate(eval_cfg)
    out = Path(eval_cfg.paths.output_dir)
    summary = json.loads((out / "vqa_closed_summary.json").read_text())
    assert set(summary["by_question_type"]) <= set(RAD3D_TASKS.values()) and summary["by_question_type"]
    assert set(summary["by_question_aspect"]) <= {"presence", "location"}
    rows = [json.loads(line) for line in (out / "vqa_closed_predictions.jsonl").read_text().splitlines()]
    assert all(row["question_aspect"] in ("presence", "location") for row in rows)
    assert any(len(row["choices"]) == 2 for row in rows) or any(len(row["choices"]) == 4 for row in rows)
    table = (out / "vqa_closed_table.md").read_text()
    assert "| question aspect |" in table
