"""Loading the causal LLM and its tokenizer for the VLM (SPEC §5), from any of three sources.

* a Hugging Face id or folder (``name_or_path``): e.g. ``Qwen/Qwen2.5-7B-Instruct``, the paper's LLM;
* a GGUF file inside a folder (``name_or_path`` + ``gguf_file``): dequantised by transformers once,
  then cached as a plain safetensors folder (dequantising takes ~20 s), keyed by the file's size and
  modification time, under ``cache_dir`` (default ``$MED3DVLM_CACHE`` or ``~/.cache/med3dvlm``);
* a config (``config``: keyword arguments of a transformers config, ``model_type`` included): a
  randomly initialised model, seeded by ``init_seed`` so every stage rebuilds the same weights.

Every tokenizer gets the ``<im_patch>`` placeholder token (SPEC §5) and a pad token.
The ``llm`` config group holds these keyword arguments.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# SPEC §5: the placeholder whose embeddings are replaced by the projector's image tokens.
IMAGE_TOKEN = "<im_patch>"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "med3dvlm"
_CONVERTED_MARKER = "converted_from.txt"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("MED3DVLM_CACHE", DEFAULT_CACHE_DIR))


def converted_gguf_folder(
    folder: str | os.PathLike, gguf_file: str, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A safetensors copy of ``folder/gguf_file`` (model + tokenizer), converted on first use.

    The cache key is the GGUF file's name, size and modification time, so a replaced file is
    converted again. Writes go to a temporary folder renamed into place, so concurrent runs are safe.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(folder) / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} not found (llm.name_or_path={folder}, llm.gguf_file={gguf_file})")
    stat = source.stat()
    target = cache_root(cache_dir) / "gguf" / f"{source.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / _CONVERTED_MARKER).exists():
        return target
    logger.info("converting %s to safetensors in %s (once; takes a while)", source, target)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    # The weights are dequantised float32 now, but the model still carries the GGUF "quantizer",
    # which refuses to save: move the weights into a plain model of the same config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _CONVERTED_MARKER).write_text(f"{source}\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source(name_or_path: str | None, gguf_file: str | None, cache_dir: str | None) -> str | None:
    if gguf_file:
        if not name_or_path:
            raise ValueError("llm.gguf_file needs llm.name_or_path, the folder that holds the GGUF file")
        return str(converted_gguf_folder(name_or_path, gguf_file, cache_dir))
    return name_or_path


def load_tokenizer(
    name_or_path: str | None = None,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    **_: Any,
):
    """The LLM's tokenizer with ``<im_patch>`` added (as a special token) and a pad token set.

    ``tokenizer`` overrides where the tokenizer is read from (needed when the model is built from a
    config). Takes the ``llm`` config group as keyword arguments; unrelated keys are ignored.
    """
    from transformers import AutoTokenizer

    source = tokenizer or _source(name_or_path, gguf_file, cache_dir)
    if not source:
        raise ValueError("the llm config names no tokenizer: set llm.tokenizer or llm.name_or_path")
    loaded = AutoTokenizer.from_pretrained(source)
    add_image_token_to_tokenizer(loaded)
    return loaded


def add_image_token_to_tokenizer(tokenizer) -> int:
    """Adds ``<im_patch>`` unless present, keeps the other special tokens, and sets a pad token."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # Llama-3 ships no pad token; padding positions are masked, so any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def load_language_model(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    config: dict[str, Any] | None = None,
    init_seed: int = 0,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    cache_dir: str | None = None,
    vocab_size: int | None = None,
    gradient_checkpointing: bool = False,
    **_: Any,
) -> nn.Module:
    """An ``AutoModelForCausalLM`` from a hub id / folder, a GGUF file, or a config (random weights).

    ``vocab_size`` (config-built models only) defaults to the tokenizer's size, set by the caller.
    ``gradient_checkpointing``: see :func:`enable_gradient_checkpointing`.
    """
    model = _load_language_model(
        name_or_path, gguf_file, config, init_seed, dtype, attn_implementation, cache_dir, vocab_size
    )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Hugging Face activation checkpointing of every decoder layer, non-reentrant: in training mode
    each layer keeps only its input and recomputes the rest in backward (the paper's 7B LoRA fine-tune
    needs it to fit 80 GB, see README "Speed"); it does nothing in eval mode or without gradients, so
    stage 2's frozen LLM is unaffected. Gradients are those of the plain model. Non-reentrant
    checkpointing needs no input that requires grad, so LoRA works without ``enable_input_require_grads``
    (peft calls it anyway when it wraps a checkpointed model). Transformers 5 renamed the method to
    ``activation_checkpointing_enable``; both are handled. Modifies ``model`` in place."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def is_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on for this LLM (inside a peft wrapper too)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _load_language_model(
    name_or_path: str | None,
    gguf_file: str | None,
    config: dict[str, Any] | None,
    init_seed: int,
    dtype: str,
    attn_implementation: str | None,
    cache_dir: str | None,
    vocab_size: int | None,
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if config is not None:
        if name_or_path or gguf_file:
            raise ValueError("give the llm either a config (random weights) or name_or_path/gguf_file, not both")
        options = dict(config)
        if "model_type" not in options:
            raise ValueError("llm.config needs a model_type (e.g. qwen2)")
        if vocab_size is not None:
            options["vocab_size"] = vocab_size
        model_config = AutoConfig.for_model(options.pop("model_type"), **options)
        if attn_implementation:
            model_config._attn_implementation = attn_implementation
        # Seeded apart from the global stream: stage 2 and stage 3 must build the same LLM.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype)
        return model
    source = _source(name_or_path, gguf_file, cache_dir)
    if not source:
        raise ValueError("the llm config gives neither name_or_path nor config")
    options = {"dtype": torch_dtype}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(source, **options)


def add_image_token_embeddings(model: nn.Module, tokenizer) -> int:
    """Makes room for ``<im_patch>`` in the embeddings and initialises its rows to the mean (SPEC §5).

    Only grows the matrices: models like Qwen2.5 carry spare (padding) rows beyond the tokenizer,
    and the new id may already fall among them. Returns the token id.
    """
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    reference_rows = min(old_rows, token_id)  # the rows of real tokens before the new one
    if token_id >= old_rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:
            matrices.append(output.weight)
        for weight in matrices:
            weight[token_id] = weight[:reference_rows].float().mean(0).to(weight.dtype)
    return token_id


def embedding_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A cheap identity of an LLM's weights: embedding shape and sum, recorded with a pretrained
    projector so a later stage cannot silently pair it with another LLM."""
    weight = model.get_input_embeddings().weight
    return {"embedding_shape": list(weight.shape), "embedding_sum": float(weight.detach().double().sum())}
