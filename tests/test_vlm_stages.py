"""Stages 2 and 3 (SPEC §5): trainable sets, hand-offs by path, configs, the closed-VQA score, and the
pipeline stage 1 export -> pretrain -> finetune -> export on tiny phantoms."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import hydra
import pytest
import torch
from hydra_helpers import CPU_TINY, compose_config, small_llm
from omegaconf import open_dict

import med3dvlm
from med3dvlm.metrics.vqa import closed_answer_is_correct, closed_vqa_accuracy
from med3dvlm.models.encoders import save_pretrained_encoder
from med3dvlm.models.vlm import load_pretrained_projector, save_pretrained_projector

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VLM_EXPERIMENTS = ["pretrain", "finetune", "pretrain_paper", "finetune_paper"]
SMALL_LLM = small_llm(layers=1)


def stage_config(tmp_path, experiment, *overrides):
    return compose_config(
        "train", [f"experiment={experiment}", "debug=tiny", *CPU_TINY, *SMALL_LLM, *overrides], tmp_path
    )


def build_stage(tmp_path, experiment, *overrides):
    torch.manual_seed(0)
    return hydra.utils.instantiate(stage_config(tmp_path, experiment, *overrides).model)


def trainable_names(module):
    return {name for name, p in module.model.named_parameters() if p.requires_grad}


# -- what each stage trains -------------------------------------------------------------------------
def test_pretrain_trains_the_projector_only_and_keeps_frozen_parts_in_eval_mode(tmp_path):
    module = build_stage(tmp_path, "pretrain")
    projector = {f"projector.{name}" for name, _ in module.model.projector.named_parameters()}
    assert trainable_names(module) == projector
    module.train()
    assert module.model.projector.training
    assert not module.model.image_encoder.training  # BatchNorm statistics stay those of stage 1
    assert not module.model.language_model.training


def test_finetune_trains_lora_encoder_projector_embeddings_and_lm_head(tmp_path):
    module = build_stage(tmp_path, "finetune")
    names = trainable_names(module)
    model = module.model
    expected = {f"image_encoder.{n}" for n, _ in model.image_encoder.named_parameters()}
    expected |= {f"projector.{n}" for n, _ in model.projector.named_parameters()}
    lora = {
        f"language_model.{n}" for n, _ in model.language_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }
    expected |= lora
    embedding = model.base_language_model().get_input_embeddings().weight
    lm_head = model.base_language_model().get_output_embeddings().weight
    assert embedding is lm_head  # the tiny config ties them: one trainable matrix
    (embedding_name,) = [n for n, p in model.named_parameters() if p is embedding]
    expected.add(embedding_name)
    assert names == expected
    # LoRA sits on every Linear except the LM head (SPEC §5): 7 per Qwen2 layer
    lora_modules = {n.rsplit(".lora_A.", 1)[0] for n in lora if ".lora_A." in n}
    assert len(lora_modules) == 7 * module.model.base_language_model().config.num_hidden_layers
    assert not any("lm_head" in n for n in lora_modules)
    assert not any("base_layer" in n for n in names)  # the LLM's own Linear weights stay frozen


def test_embedding_lr_gives_the_embeddings_and_lm_head_their_own_adamw_step(tmp_path):
    module = build_stage(
        tmp_path, "finetune", "model.optimizer.lr=1e-3", "model.embedding_lr=1e-5", "model.vision_lr=null"
    )
    embedding = module.model.base_language_model().get_input_embeddings().weight
    optimizer = module.optimizer_factory(module.parameter_groups())
    rest, embeddings = optimizer.param_groups
    assert rest["lr"] == 1e-3 and embeddings["lr"] == 1e-5
    assert len(embeddings["params"]) == 1 and embeddings["params"][0] is embedding  # tied with the LM head: once
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in module.model.parameters() if p.requires_grad}
    # AdamW's first step moves every element with a gradient by its group's lr (|g| >> eps, no weight decay)
    before = {id(p): p.detach().clone() for p in grouped}
    for p in grouped:
        p.grad = torch.randn_like(p).sign() * (1 + torch.rand_like(p))  # |g| >= 1
    optimizer.step()
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = (p.detach() - before[id(p)]).abs()
            assert torch.allclose(step, torch.full_like(step, group["lr"]), rtol=1e-3, atol=1e-7)
    # unset: one group at the optimizer's lr; stage 2 (embeddings frozen): one group even when set
    for experiment, embedding_lr in (("finetune", "null"), ("pretrain", "1e-5")):
        module = build_stage(tmp_path, experiment, f"model.embedding_lr={embedding_lr}", "model.vision_lr=null")
        (group,) = module.optimizer_factory(module.parameter_groups()).param_groups
        assert len(group["params"]) == len([p for p in module.model.parameters() if p.requires_grad])


def test_vision_lr_gives_the_encoder_and_projector_their_own_group_in_stage_3(tmp_path):
    module = build_stage(
        tmp_path, "finetune", "model.optimizer.lr=1e-3", "model.embedding_lr=1e-5", "model.vision_lr=5e-5"
    )
    rest, embeddings, vision = module.optimizer_factory(module.parameter_groups()).param_groups
    assert (rest["lr"], embeddings["lr"], vision["lr"]) == (1e-3, 1e-5, 5e-5)
    model = module.model
    expected_vision = {id(p) for p in [*model.image_encoder.parameters(), *model.projector.parameters()]}
    assert {id(p) for p in vision["params"]} == expected_vision
    lora = {id(p) for n, p in model.language_model.named_parameters() if "lora_" in n}
    assert {id(p) for p in rest["params"]} == lora  # what is left in stage 3: the adapters
    # stage 2: the projector is all that trains, at the optimizer's lr, whatever vision_lr says
    module = build_stage(tmp_path, "pretrain", "model.optimizer.lr=1e-3", "model.vision_lr=5e-5")
    (group,) = module.optimizer_factory(module.parameter_groups()).param_groups
    assert group["lr"] == 1e-3
    assert {id(p) for p in group["params"]} == {id(p) for p in module.model.projector.parameters()}


def test_fit_start_puts_the_trained_parts_in_train_mode(tmp_path):
    # the LLM comes from transformers in eval mode, and Lightning does not call train() itself
    for stage, llm_trains in (("finetune", True), ("pretrain", False)):
        module = build_stage(tmp_path / stage, stage)
        module.eval()
        module.on_fit_start()
        dropouts = [m for n, m in module.model.language_model.named_modules() if n.endswith("lora_dropout.default")]
        assert bool(dropouts) == llm_trains
        assert all(m.training for m in dropouts)  # SPEC §5: LoRA dropout 0.05 while training
        assert module.model.projector.training
        assert module.model.image_encoder.training == llm_trains == module.model.language_model.training


def test_freeze_encoder_batchnorm_keeps_stage1_statistics_while_the_encoder_trains(tmp_path):
    for freeze in (True, False):
        module = build_stage(
            tmp_path / str(freeze), "finetune", f"model.freeze_encoder_batchnorm={str(freeze).lower()}"
        )
        module.on_fit_start()
        encoder = module.model.image_encoder
        norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(m.training != freeze for m in norms)
        assert encoder.training and all(p.requires_grad for m in norms for p in m.parameters())  # affine trains
        before = [m.running_mean.clone() for m in norms]
        volumes = torch.rand(2, 1, *stage_config(tmp_path, "finetune").data.image_size)
        encoder(volumes)
        unchanged = [torch.equal(b, m.running_mean) for b, m in zip(before, norms)]
        assert all(unchanged) if freeze else not any(unchanged)


# -- hand-offs --------------------------------------------------------------------------------------
def test_stage1_encoder_and_stage2_projector_are_loaded_by_path(tmp_path):
    pretrain = build_stage(tmp_path / "a", "pretrain")
    with torch.no_grad():
        for p in pretrain.model.projector.parameters():
            p.add_(torch.randn_like(p))
    encoder_dir = save_pretrained_encoder(pretrain.model.image_encoder, tmp_path / "image_encoder")
    projector_dir = save_pretrained_projector(pretrain.model, tmp_path / "projector")

    finetune = build_stage(
        tmp_path / "b", "finetune", f"encoder.pretrained={encoder_dir}", f"model.projector_path={projector_dir}"
    )
    for name, value in pretrain.model.projector.state_dict().items():
        assert torch.equal(finetune.model.projector.state_dict()[name], value), name
    for name, value in pretrain.model.image_encoder.state_dict().items():
        assert torch.equal(finetune.model.image_encoder.state_dict()[name], value), name
    assert finetune.encoder_path == str(encoder_dir)


def test_projector_hand_off_refuses_another_llm_or_another_projector(tmp_path):
    pretrain = build_stage(tmp_path / "a", "pretrain")
    projector_dir = save_pretrained_projector(pretrain.model, tmp_path / "projector")
    other_llm = build_stage(tmp_path / "b", "pretrain", "llm.init_seed=1")
    with pytest.raises(ValueError, match="pretrained against another LLM"):
        load_pretrained_projector(other_llm.model, projector_dir)
    other_projector = build_stage(tmp_path / "c", "pretrain", "projector.low_output_size=[12,4]")
    with pytest.raises(ValueError, match="low_output_size"):
        load_pretrained_projector(other_projector.model, projector_dir)
    with pytest.raises(FileNotFoundError, match="projector/ folder of a pretrain run"):
        load_pretrained_projector(pretrain.model, tmp_path / "nowhere")


# -- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", VLM_EXPERIMENTS)
def test_every_vlm_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", "trainer.accelerator=cpu"], tmp_path)
    assert cfg.model.stage == experiment.split("_")[0]
    assert cfg.trainer.gradient_clip_val == 1.0  # the HF Trainer default the released scripts train with
    if experiment.endswith("paper"):  # SPEC §5 recipes
        mixture = {
            "pretrain": ["caption", "vqa_closed", "vqa_open"],
            "finetune": ["caption", "vqa_closed", "vqa_open", "vqa_yes_no"],
        }
        assert list(cfg.data.datamodule.tasks) == mixture[cfg.model.stage]
        recipe = {"pretrain": (1e-4, 16, 3), "finetune": (5e-5, 8, 5)}[cfg.model.stage]
        assert cfg.trainer.limit_train_batches is None and cfg.trainer.limit_val_batches is None
        assert (cfg.model.optimizer.lr, cfg.data.datamodule.batch_size, cfg.trainer.max_epochs) == recipe
        assert cfg.model.optimizer.weight_decay == 0.0 and cfg.model.warmup_ratio == 0.03
        assert dict(cfg.model.lora) == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
        # none of the CPU default's departures leaks into the paper's recipe through the defaults list
        assert cfg.data.datamodule.max_samples is None and cfg.data.datamodule.train_question_types is None
        assert cfg.data.datamodule.closed_answer_format == "{letter}. {answer}"  # SPEC §6
        assert (cfg.model.embedding_lr, cfg.model.vision_lr, cfg.model.freeze_encoder_batchnorm) == (None, None, False)
        assert cfg.llm.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and cfg.projector.num_image_tokens == 256
        # the hub LLM is replaced by the offline one: this checks the wiring, not the download
        with open_dict(cfg):
            cfg.llm = stage_config(tmp_path / "tiny", "pretrain").llm
            cfg.trainer.strategy = "auto"
            cfg.trainer.precision = "32-true"
    module = hydra.utils.instantiate(cfg.model)
    assert module.model.num_image_tokens == cfg.projector.num_image_tokens
    collator = hydra.utils.instantiate(cfg.collator)
    assert collator.num_image_tokens == module.model.num_image_tokens
    datamodule = hydra.utils.instantiate(cfg.data.datamodule)
    assert datamodule.tasks == tuple(cfg.data.datamodule.tasks)
    hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])


@pytest.mark.parametrize("llm", sorted(p.stem for p in (CONFIGS / "llm").glob("*.yaml")))
def test_every_llm_config_composes(llm, tmp_path):
    cfg = compose_config("train", ["experiment=pretrain", f"llm={llm}"], tmp_path)
    assert (cfg.llm.name_or_path is None) != (cfg.llm.config is None)
    if cfg.llm.gguf_file:
        assert (Path(cfg.llm.name_or_path) / cfg.llm.gguf_file).is_file()
    if cfg.llm.config is not None:
        assert (Path(cfg.llm.tokenizer) / "tokenizer.json").is_file()


def test_a_projector_config_with_the_wrong_token_count_says_which_is_right(tmp_path):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="set projector.num_image_tokens=1"):
        build_stage(tmp_path, "pretrain", "projector=mlp")  # s4 of nano at 16x32x32 is one token


# -- the closed-VQA score ------------------------------------------------------------------------
def test_closed_answer_rule_is_the_letter_followed_by_a_period():
    assert closed_answer_is_correct("C. Sagittal", "C")
    assert closed_answer_is_correct("The answer is C.", "C")
    assert not closed_answer_is_correct("C Sagittal", "C")
    assert not closed_answer_is_correct("B. Coronal", "C")
    assert not closed_answer_is_correct("c. sagittal", "C")
    with pytest.raises(ValueError, match="answer letter"):
        closed_answer_is_correct("E.", "E")


def test_closed_vqa_accuracy_per_type_and_overall():
    records = [
        {"question_type": "Plane", "correct": True},
        {"question_type": "Plane", "correct": False},
        {"question_type": "Organ", "correct": True},
        {"question_type": "Phase", "correct": False},
    ]
    results = closed_vqa_accuracy(records)
    assert list(results["accuracy"]) == ["Plane", "Phase", "Organ", "overall"]  # SPEC §6 order
    assert results["accuracy"]["Plane"] == {"accuracy": 0.5, "count": 2}
    assert results["accuracy"]["overall"] == {"accuracy": 0.5, "count": 4}
    assert results["chance"] == 0.25
    assert math.isnan(closed_vqa_accuracy([])["accuracy"]["overall"]["accuracy"])


# -- the pipeline on tiny phantoms ----------------------------------------------------------------
def pipeline_config(tmp_path, run, experiment, *overrides):
    cfg = stage_config(
        tmp_path / run,
        experiment,
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.monitor=null",
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path / "data")  # both stages share one phantom set
        cfg.data.datamodule.root = str(tmp_path / "data" / "phantoms")
        # Hydra's own node holds run-time values (job.num, runtime.output_dir) that only a real
        # Hydra run sets; train() resolves the whole config for the checkpoint, so leave it out
        del cfg["hydra"]
    return cfg


def test_pretrain_then_finetune_then_export_on_tiny_phantoms(tmp_path, capsys):
    from med3dvlm.checkpoints import load_stage_checkpoint
    from med3dvlm.checkpoints.export import export_vlm
    from med3dvlm.train import train

    stage1 = build_stage(tmp_path / "stage1", "pretrain").model.image_encoder  # stands in for a siglip run
    encoder_dir = save_pretrained_encoder(stage1, tmp_path / "siglip" / "image_encoder")

    pretrain = pipeline_config(tmp_path, "pretrain", "pretrain", f"encoder.pretrained={encoder_dir}", "test=false")
    train(pretrain)
    pretrain_run = Path(pretrain.paths.output_dir)
    assert (pretrain_run / "projector" / "model.safetensors").exists()

    finetune = pipeline_config(
        tmp_path,
        "finetune",
        "finetune",
        f"encoder.pretrained={pretrain_run / 'image_encoder'}",
        f"model.projector_path={pretrain_run / 'projector'}",
    )
    metrics = train(finetune)
    finetune_run = Path(finetune.paths.output_dir)
    results = json.loads((finetune_run / "vqa_closed.json").read_text())
    assert results["accuracy"]["overall"]["count"] > 0  # closed questions were answered and scored
    assert "test/closed_vqa_accuracy/overall" in metrics
    assert "Closed-ended VQA accuracy" in capsys.readouterr().out

    checkpoint = finetune_run / "checkpoints" / "last.ckpt"
    folder = export_vlm(checkpoint, tmp_path / "exported")
    unmerged = load_stage_checkpoint(checkpoint).model.eval()
    assert unmerged.has_lora
    loaded = med3dvlm.Med3DVLM.from_pretrained(folder)
    images = torch.rand(2, 1, *loaded.image_size, generator=torch.Generator().manual_seed(0))
    input_ids, mask = loaded.tokenize_prompts(["Which organ contains the lesion?", "What is the phase?"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images, input_ids, mask).logits, unmerged(images, input_ids, mask).logits, rtol=1e-4, atol=1e-4
        )
