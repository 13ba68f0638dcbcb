"""What ``python -m med3dvlm.prepare`` runs: a ``configs/prepare.yaml`` config -> the source it names,
or the conversion; the summary printed and, with ``summary_file``, saved."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from med3dvlm.data.prepare.convert import convert_dataset
from med3dvlm.data.prepare.ct_rate import DEFAULT_TEST_FRACTION, prepare_ct_rate
from med3dvlm.data.prepare.folders import prepare_dataset
from med3dvlm.data.prepare.pipeline import Summary
from med3dvlm.data.prepare.settings import (
    DEFAULT_SPLIT_FRACTIONS,
    PREPARE_SOURCES,
    PreparationError,
    PrepareSettings,
    SplitRule,
)
from med3dvlm.data.preprocessing import PREPARED_SHAPE
from med3dvlm.data.volumes import FAST_VOLUME_FORMAT
from med3dvlm.utils import json_bytes, write_atomic


def run_from_config(cfg: Mapping[str, Any]) -> Summary:
    """Run what a ``configs/prepare.yaml`` config asks for; print and save the summary."""
    summary = _run(cfg)
    print(summary.text())
    if cfg.get("summary_file"):
        write_atomic(Path(cfg["summary_file"]), json_bytes(summary.to_json(), indent=1))
    return summary


def _run(cfg: Mapping[str, Any]) -> Summary:
    common = {"workers": cfg.get("workers"), "progress": bool(cfg.get("progress", True))}
    formats = tuple(cfg.get("formats") or ("nii.gz", FAST_VOLUME_FORMAT))
    if cfg.get("convert"):
        if cfg.get("raw_dir"):
            raise PreparationError("give either raw_dir=... out_dir=... or convert=..., not both")
        return convert_dataset(cfg["convert"], formats, cfg.get("fast_encoding", "uint8"), **common)
    if cfg.get("source", "folders") not in PREPARE_SOURCES:
        raise PreparationError(f"source must be one of {PREPARE_SOURCES}, got {cfg.get('source')!r}")
    if not cfg.get("raw_dir") or not cfg.get("out_dir"):
        raise PreparationError(
            "nothing to do: give raw_dir=RAW out_dir=OUT (prepare raw cases) or convert=ROOT "
            "(add fast copies to a prepared dataset)"
        )
    settings = PrepareSettings(
        shape=tuple(cfg.get("shape") or PREPARED_SHAPE),
        formats=formats,
        fast_encoding=cfg.get("fast_encoding", "uint8"),
        hu_window=None if cfg.get("hu_window") is None else tuple(cfg["hu_window"]),
        reorient=bool(cfg.get("reorient", True)),
        series_layout=cfg.get("series_layout", "file"),
        cases_dir=cfg.get("cases_dir", "ct_case"),
        report_file=cfg.get("report_file", "text.txt"),
        require_report=bool(cfg.get("require_report", True)),
    )
    common["overwrite"] = bool(cfg.get("overwrite"))
    if cfg.get("source") == "ct_rate":
        options = cfg.get("ct_rate") or {}
        if options.get("hu_window") is not None:
            settings = dataclasses.replace(settings, hu_window=tuple(options["hu_window"]))
        return prepare_ct_rate(
            cfg["raw_dir"],
            cfg["out_dir"],
            settings,
            rad3d_dir=cfg.get("rad3d_dir"),
            test_fraction=float(options.get("test_fraction", DEFAULT_TEST_FRACTION)),
            seed=int(options.get("seed", 0)),
            storage=str(options.get("storage", "auto")),
            **common,
        )
    split_cfg = cfg.get("split") or {}
    split = SplitRule(
        fractions=tuple(split_cfg.get("fractions") or DEFAULT_SPLIT_FRACTIONS),
        seed=int(split_cfg.get("seed") or 0),
        file=split_cfg.get("file"),
    )
    return prepare_dataset(
        cfg["raw_dir"],
        cfg["out_dir"],
        settings,
        split,
        cfg.get("vqa_dir"),
        reports_csv=cfg.get("reports_csv"),
        **common,
    )
