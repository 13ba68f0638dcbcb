"""Compose the real shipped configs in tests (lightning-hydra-template style), then shrink them."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from med3dvlm.resolvers import register_resolvers

CPU_TINY = [
    "trainer.accelerator=cpu",
    # one process: the CPU VLM experiments pick strategy=cpu_ddp, which would start more processes
    # by re-running the command line (pytest's); tests/test_cpu_ddp.py runs that path for real
    "strategy=single",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


def small_llm(layers: int = 1) -> list[str]:
    """Overrides that pick the tiny LLM (``llm=tiny``) and shrink it to width 32 and ``layers`` layers."""
    return [
        "llm=tiny",
        "llm.config.hidden_size=32",
        "llm.config.intermediate_size=64",
        f"llm.config.num_hidden_layers={layers}",
        "llm.config.num_attention_heads=2",
        "llm.config.num_key_value_heads=1",
    ]


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """The composed config with outputs and data under ``tmp_path`` and Hydra's runtime set."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module("med3dvlm.configs", version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.work_dir = str(tmp_path)
    return cfg
