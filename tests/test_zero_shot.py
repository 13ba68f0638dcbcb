"""Zero-shot abnormality classification (``med3dvlm.evaluation.zero_shot``, ``eval=zero_shot``): probabilities
against a hand computation from the model's own embeddings, metrics against scikit-learn, the entry
point's files, and its errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

import med3dvlm
from med3dvlm.data.ct_rate import ABNORMALITY_LABELS
from med3dvlm.evaluation.zero_shot import (
    DEFAULT_LOGIT_SCALE,
    DEFAULT_THRESHOLD,
    PROMPT_TEMPLATES,
    ZeroShotScorer,
    format_zero_shot_table,
    label_prompts,
    zero_shot_metrics,
    zero_shot_probabilities,
)

SINGLE_CLASS_LABEL = "Hiatal hernia"  # all 0 in the test CSV: AUROC undefined


@pytest.fixture(scope="module")
def clip(tiny_models):
    return med3dvlm.load_model(tiny_models.clip_dir)


def made_up_targets(volumes: int) -> np.ndarray:
    """0/1 per volume and label: both classes in every label but SINGLE_CLASS_LABEL."""
    rng = np.random.default_rng(3)
    targets = np.zeros((volumes, len(ABNORMALITY_LABELS)), dtype=int)
    for column, label in enumerate(ABNORMALITY_LABELS):
        if label != SINGLE_CLASS_LABEL:
            positives = rng.choice(volumes, size=int(rng.integers(1, volumes)), replace=False)
            targets[positives, column] = 1
    return targets


@pytest.fixture(scope="module")
def labelled_root(tiny_models, tmp_path_factory):
    """A prepared CT-RATE-style root: the phantom volumes and CT-RATE-labels/test.csv with made-up labels."""
    root = tmp_path_factory.mktemp("ct_rate_root")
    targets = made_up_targets(len(tiny_models.volumes))
    rows = []
    for index, (volume, row) in enumerate(zip(tiny_models.volumes, targets), start=1):
        relative = f"volumes/valid_{index}_a_1.nii.gz"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(volume, root / relative)
        rows.append([relative, f"valid_{index}_a_1.nii.gz", *map(str, row)])
    (root / "CT-RATE-labels").mkdir()
    with (root / "CT-RATE-labels" / "test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Path", "VolumeName", *ABNORMALITY_LABELS])
        writer.writerows(rows)
    return root, [root / row[0] for row in rows], targets


def hand_probabilities(clip, volumes, labels) -> np.ndarray:
    """softmax(scale * [cos(volume, "<label> is present."), cos(volume, "<label> is not present.")])[0],
    written out from embed_images / embed_texts."""
    images = clip.embed_images(volumes).double()
    expected = np.zeros((len(volumes), len(labels)))
    for column, label in enumerate(labels):
        present, absent = clip.embed_texts([f"{label} is present.", f"{label} is not present."]).double()
        for row, image in enumerate(images):
            a = math.exp(10.0 * float(image @ present))
            b = math.exp(10.0 * float(image @ absent))
            expected[row, column] = a / (a + b)
    return expected


def test_probabilities_equal_the_softmax_of_the_scaled_prompt_similarities(clip, labelled_root):
    _, volumes, _ = labelled_root
    probabilities = zero_shot_probabilities(clip, volumes, batch_size=4)
    assert probabilities.shape == (len(volumes), len(ABNORMALITY_LABELS))
    np.testing.assert_allclose(probabilities.numpy(), hand_probabilities(clip, volumes, ABNORMALITY_LABELS), atol=1e-5)
    # batch prediction's scorer gives the same numbers from precomputed image embeddings
    scorer = ZeroShotScorer(ABNORMALITY_LABELS[:3])
    scored = scorer(clip, clip.embed_images(volumes))
    assert list(scored[0]) == list(ABNORMALITY_LABELS[:3])
    np.testing.assert_allclose([list(row.values()) for row in scored], probabilities[:, :3].numpy(), atol=1e-5)


def test_the_scale_changes_probabilities_but_not_the_decision_at_one_half(clip, labelled_root):
    _, volumes, _ = labelled_root
    default = zero_shot_probabilities(clip, volumes, ABNORMALITY_LABELS[:4])
    sharper = zero_shot_probabilities(clip, volumes, ABNORMALITY_LABELS[:4], logit_scale=50.0)
    assert not torch.allclose(default, sharper)
    assert torch.equal(default > 0.5, sharper > 0.5)


def test_prompts_and_settings_are_ct_clips_and_the_config_matches_the_constants(tmp_path):
    from hydra_helpers import compose_config

    assert label_prompts(["Emphysema"]) == [("Emphysema is present.", "Emphysema is not present.")]
    settings = compose_config("eval", ["eval=zero_shot"], tmp_path).eval
    assert (settings.positive_prompt, settings.negative_prompt) == PROMPT_TEMPLATES
    assert settings.logit_scale == pytest.approx(DEFAULT_LOGIT_SCALE) and DEFAULT_LOGIT_SCALE == pytest.approx(10.0)
    assert settings.threshold == DEFAULT_THRESHOLD == 0.5
    with pytest.raises(ValueError, match="placeholder"):
        label_prompts(["Emphysema"], ("present", "{label} absent"))


def test_metrics_equal_scikit_learns_and_leave_a_single_class_label_out_of_the_macro_auroc():
    rng = np.random.default_rng(0)
    labels = ["A", "B", "C", "D"]
    targets = rng.integers(0, 2, size=(40, 4))
    targets[:, 2] = 1  # one class only
    probabilities = rng.random((40, 4))
    probabilities[:5, 0] = 0.5  # exactly at the threshold: negative (strictly above counts)
    for threshold in (0.5, 0.3):
        metrics = zero_shot_metrics(torch.tensor(probabilities), torch.tensor(targets), labels, threshold)
        predicted = (probabilities > threshold).astype(int)
        for column, label in enumerate(labels):
            values = metrics["labels"][label]
            truth = targets[:, column]
            assert values["f1"] == pytest.approx(f1_score(truth, predicted[:, column], zero_division=0))
            assert values["accuracy"] == pytest.approx(accuracy_score(truth, predicted[:, column]))
            assert values["positives"] == truth.sum() and values["negatives"] == 40 - truth.sum()
            if label == "C":
                assert values["auroc"] is None
            else:
                assert values["auroc"] == pytest.approx(roc_auc_score(truth, probabilities[:, column]))
        macro = metrics["macro"]
        defined = [roc_auc_score(targets[:, c], probabilities[:, c]) for c in (0, 1, 3)]
        assert macro["auroc"] == pytest.approx(np.mean(defined))
        assert macro["auroc_labels"] == 3 and macro["auroc_undefined"] == ["C"]
        f1s = [f1_score(targets[:, c], predicted[:, c], zero_division=0) for c in range(4)]
        assert macro["f1"] == pytest.approx(np.mean(f1s))
        assert macro["accuracy"] == pytest.approx(
            np.mean([accuracy_score(targets[:, c], predicted[:, c]) for c in range(4)])
        )
    table = format_zero_shot_table(metrics)
    assert "| C | 40/40 | n/a |" in table and "macro AUROC over the other 3 of 4 labels" in table


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match=r"\(volumes, 2 labels\)"):
        zero_shot_metrics(torch.rand(3, 3), torch.ones(3, 3), ["A", "B"])
    with pytest.raises(ValueError, match="0 or 1"):
        zero_shot_metrics(torch.rand(3, 1), torch.full((3, 1), 2), ["A"])
    with pytest.raises(ValueError, match="threshold"):
        zero_shot_metrics(torch.rand(3, 1), torch.ones(3, 1), ["A"], threshold=1.0)


def eval_config(tmp_path: Path, *overrides: str):
    from hydra_helpers import compose_config

    return compose_config("eval", ["eval=zero_shot", "accelerator=cpu", "eval.num_workers=0", *overrides], tmp_path)


def test_eval_entry_point_writes_predictions_summary_and_table(tiny_models, clip, labelled_root, tmp_path, capsys):
    from med3dvlm.evaluation.evaluator import evaluate

    root, volumes, targets = labelled_root
    cfg = eval_config(tmp_path / "export", f"model_dir={tiny_models.clip_dir}", f"data_root={root}")
    summary = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    rows = [json.loads(line) for line in (out / "zero_shot_predictions.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == [str(v.relative_to(root)) for v in volumes]
    assert rows[0]["VolumeName"] == "valid_1_a_1.nii.gz"
    probabilities = np.array([[row["probabilities"][label] for label in ABNORMALITY_LABELS] for row in rows])
    np.testing.assert_allclose(probabilities, hand_probabilities(clip, volumes, ABNORMALITY_LABELS), atol=1e-5)
    assert [[row["targets"][label] for label in ABNORMALITY_LABELS] for row in rows] == targets.tolist()

    written = json.loads((out / "zero_shot_summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["num_volumes"] == len(volumes) and written["split"] == "test"
    assert written["labels"][SINGLE_CLASS_LABEL]["auroc"] is None
    assert written["macro"]["auroc_undefined"] == [SINGLE_CLASS_LABEL] and written["macro"]["auroc_labels"] == 17
    column = ABNORMALITY_LABELS.index("Emphysema")
    assert written["labels"]["Emphysema"]["auroc"] == pytest.approx(
        roc_auc_score(targets[:, column], probabilities[:, column])
    )
    table = (out / "zero_shot_table.md").read_text()
    assert "| Macro |" in table and f"| {SINGLE_CLASS_LABEL} | 0/{len(volumes)} | n/a |" in table
    assert table.strip() in capsys.readouterr().out

    # the training checkpoint of the same model gives the same numbers
    cfg = eval_config(
        tmp_path / "checkpoint", f"ckpt_path={tiny_models.clip_checkpoint}", f"data_root={root}", "eval.limit=3"
    )
    from_checkpoint = evaluate(cfg)
    assert from_checkpoint["num_volumes"] == 3 and from_checkpoint["ckpt_path"] == str(tiny_models.clip_checkpoint)
    rows = [
        json.loads(line)
        for line in (Path(cfg.paths.output_dir) / "zero_shot_predictions.jsonl").read_text().splitlines()
    ]
    again = np.array([[row["probabilities"][label] for label in ABNORMALITY_LABELS] for row in rows])
    np.testing.assert_allclose(again, probabilities[:3], atol=1e-5)


def test_eval_errors_name_the_problem(tiny_models, labelled_root, tmp_path):
    from med3dvlm.checkpoints import CONFIG_CHECKPOINT_KEY
    from med3dvlm.data.errors import MissingFileError
    from med3dvlm.evaluation.evaluator import evaluate

    root, _, _ = labelled_root
    empty = tmp_path / "no_labels"
    empty.mkdir()
    clip_dir = f"model_dir={tiny_models.clip_dir}"
    with pytest.raises(MissingFileError, match=r"CT-RATE-labels/test\.csv: labels file not found"):
        evaluate(eval_config(tmp_path / "a", clip_dir, f"data_root={empty}"))
    with pytest.raises(MissingFileError, match=r"validation\.csv"):
        evaluate(eval_config(tmp_path / "b", clip_dir, f"data_root={root}", "eval.split=validation"))
    with pytest.raises(ValueError, match="needs data_root"):
        evaluate(eval_config(tmp_path / "c", clip_dir))
    with pytest.raises(ValueError, match="ckpt_path=<stage-1 checkpoint> or model_dir"):
        evaluate(eval_config(tmp_path / "d", f"data_root={root}"))
    with pytest.raises(ValueError, match="not both"):
        evaluate(eval_config(tmp_path / "e", clip_dir, f"ckpt_path={tiny_models.clip_checkpoint}", f"data_root={root}"))
    with pytest.raises(ValueError, match=r"is a VLM \(stages 2-3\); eval=zero_shot needs a stage-1"):
        evaluate(eval_config(tmp_path / "f", f"model_dir={tiny_models.vlm_dir}", f"data_root={root}"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(eval_config(tmp_path / "g", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"data_root={root}"))
    # a stage-2/3 checkpoint is refused before its model is built
    checkpoint = torch.load(tiny_models.clip_checkpoint, map_location="cpu", weights_only=True)
    checkpoint[CONFIG_CHECKPOINT_KEY]["model"]["_target_"] = "med3dvlm.stages.vlm.VLMStage"
    torch.save(checkpoint, tmp_path / "vlm.ckpt")
    with pytest.raises(ValueError, match=r"vlm\.ckpt is a stage-2/3 \(VLM\) checkpoint"):
        evaluate(eval_config(tmp_path / "h", f"ckpt_path={tmp_path / 'vlm.ckpt'}", f"data_root={root}"))


def test_probabilities_refuse_a_vlm(tiny_models, labelled_root):
    _, volumes, _ = labelled_root
    vlm = med3dvlm.load_model(tiny_models.vlm_dir)
    with pytest.raises(ValueError, match="needs a stage-1"):
        zero_shot_probabilities(vlm, volumes)
