"""Writing the phantom dataset in the M3D layout: ``make_phantom_dataset`` (always) and
``ensure_phantom_dataset`` (only when the root does not already hold it), with the ``.phantom.json``
marker that claims a root and records what it holds."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from med3dvlm.data import layout
from med3dvlm.data.phantoms.anatomy import sample_case
from med3dvlm.data.phantoms.rendering import render_volume
from med3dvlm.data.phantoms.text import write_case_texts
from med3dvlm.data.preprocessing import PREPROCESSING_FILE, Preprocessing, write_preprocessing
from med3dvlm.data.volumes import save_volume
from med3dvlm.utils import csv_bytes, json_bytes, write_atomic

GENERATOR = "med3dvlm.data.phantoms"  # what every marker records: the package, whichever module writes it
GENERATOR_VERSION = 1
MARKER_NAME = ".phantom.json"
CASES_DIR = "ct_case"
DEFAULT_NUM_CASES = 40
DEFAULT_SHAPE = (64, 128, 128)
MAX_SHAPE = (128, 256, 256)
MIN_DIM = 16
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
VOLUME_FORMATS = ("nii.gz", "npy")
MIN_CASES = len(layout.CAP_SPLITS)
# Phantom intensities stand for HU through this linear map (0 = -1000 HU air, 1 = +1000 HU), so a
# phantom can be written as the HU NIfTI or DICOM series a scanner would give (tests, demos).
PHANTOM_HU_WINDOW = (-1000.0, 1000.0)


@dataclass(frozen=True)
class PhantomDataset:
    """Where a generated phantom dataset lives and what it holds."""

    root: Path
    num_cases: int
    shape: tuple[int, int, int]
    seed: int
    volume_format: str
    split_cases: dict[str, int]
    split_vqa: dict[str, int]
    split_yes_no: dict[str, int]
    generated: bool  # False when ensure_phantom_dataset found it already there

    @property
    def cap_json(self) -> Path:
        return self.root / layout.CAP_JSON

    def vqa_csv(self, split: str) -> Path:
        return self.root / layout.VQA_DIR / layout.VQA_CSV[split]

    def vqa_yes_no_csv(self, split: str) -> Path:
        return self.root / layout.VQA_DIR / layout.VQA_YN_CSV[split]

    def summary(self) -> str:
        splits = " / ".join(f"{s} {self.split_cases[s]}" for s in layout.CAP_SPLITS)
        shape = "x".join(map(str, self.shape))
        return (
            f"phantom dataset at {self.root}: {self.num_cases} cases ({splits}), {shape} {self.volume_format}, "
            f"{sum(self.split_vqa.values())} closed/open QA, {sum(self.split_yes_no.values())} yes/no QA"
        )


def _normalise_params(
    num_cases: int, shape: Sequence[int], seed: int, volume_format: str, split_fractions: Sequence[float]
) -> dict:
    """Validated parameters in the form stored in the marker (JSON types)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (D, H, W), got {shape}")
    for dim, value, largest in zip("DHW", shape, MAX_SHAPE):
        if not MIN_DIM <= value <= largest:
            raise ValueError(
                f"shape {shape}: {dim} = {value} is outside [{MIN_DIM}, {largest}] "
                f"(each dimension at least {MIN_DIM}, at most {MAX_SHAPE})"
            )
    fmt = str(volume_format).lstrip(".")
    if fmt not in VOLUME_FORMATS:
        raise ValueError(f"volume_format must be one of {VOLUME_FORMATS}, got {volume_format!r}")
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    fractions = [float(f) for f in split_fractions]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three positive numbers summing to 1, got {split_fractions}")
    num_cases = int(num_cases)
    _split_sizes(num_cases, fractions)  # validates num_cases
    return {
        "num_cases": num_cases,
        "shape": list(shape),
        "seed": seed,
        "volume_format": fmt,
        "split_fractions": fractions,
    }


def _split_sizes(num_cases: int, fractions: Sequence[float]) -> dict[str, int]:
    """Case counts per split; every split non-empty."""
    n_val = max(1, round(num_cases * fractions[1]))
    n_test = max(1, round(num_cases * fractions[2]))
    n_train = num_cases - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"num_cases = {num_cases} is too small for split fractions {list(fractions)}: every split "
            f"needs at least one case (use at least {MIN_CASES} cases)"
        )
    return dict(zip(layout.CAP_SPLITS, (n_train, n_val, n_test)))


def read_phantom_marker(root: str | os.PathLike) -> dict | None:
    """The marker of a phantom dataset at ``root``, or None if there is none (or it is unreadable)."""
    path = Path(root) / MARKER_NAME
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") != GENERATOR:
        return None
    return marker


def phantom_preprocessing(shape: Sequence[int]) -> Preprocessing:
    """What the phantoms stand for as preprocessed CT: HU through ``PHANTOM_HU_WINDOW``, not cropped
    (the phantom is drawn at its final size), at ``shape``. Recorded in every phantom root, so a model
    trained on phantoms reads a phantom written as HU NIfTI or DICOM as the phantom itself."""
    return Preprocessing(hu_window=PHANTOM_HU_WINDOW, crop_foreground=False, shape=tuple(shape))


def make_phantom_dataset(
    root: str | os.PathLike,
    num_cases: int = DEFAULT_NUM_CASES,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    volume_format: str = "nii.gz",
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
) -> PhantomDataset:
    """Write the phantom dataset to ``root`` (always, replacing a previous phantom dataset there).

    Refuses a non-empty ``root`` that holds no phantom marker unless ``overwrite``: a wrong path must
    not scribble over real data. Files of a previous phantom dataset that the new one does not
    write are removed. The marker says "complete" only at the end, so an interrupted run is redone
    by ``ensure_phantom_dataset``.
    """
    params = _normalise_params(num_cases, shape, seed, volume_format, split_fractions)
    root = Path(root)
    previous = read_phantom_marker(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder")
    if previous is None and root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{root} is not empty and holds no phantom dataset ({MARKER_NAME} missing); "
            "choose an empty folder or pass overwrite=True (--overwrite)"
        )
    root.mkdir(parents=True, exist_ok=True)

    shape = tuple(params["shape"])
    sizes = _split_sizes(params["num_cases"], params["split_fractions"])
    split_of = [s for s in layout.CAP_SPLITS for _ in range(sizes[s])]
    cases = [sample_case(params["seed"], index) for index in range(params["num_cases"])]
    images = [f"{CASES_DIR}/{c.case_id}/{c.series}/volume.{params['volume_format']}" for c in cases]
    texts = [f"{CASES_DIR}/{c.case_id}/text.txt" for c in cases]
    tables = [f"{layout.VQA_DIR}/{layout.VQA_CSV[s]}" for s in layout.CAP_SPLITS]
    tables += [f"{layout.VQA_DIR}/{layout.VQA_YN_CSV[s]}" for s in layout.CAP_SPLITS]
    files = sorted(images + texts + tables + [layout.CAP_JSON, PREPROCESSING_FILE])
    # An incomplete marker first: it claims the root (so a rerun may write there) and lists every
    # file this run or the previous one may have written (so a rerun can clean them up).
    old_files = set(previous.get("files", [])) if previous else set()
    marker = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "complete": False,
        "params": params,
        "files": sorted(old_files | set(files)),
    }
    write_atomic(root / MARKER_NAME, json_bytes(marker, ensure_ascii=True))

    cap: dict[str, list[dict[str, str]]] = {s: [] for s in layout.CAP_SPLITS}
    vqa: dict[str, list[list]] = {s: [] for s in layout.CAP_SPLITS}
    yes_no: dict[str, list[list]] = {s: [] for s in layout.CAP_SPLITS}
    for case, split, image, text in zip(cases, split_of, images, texts):
        save_volume(render_volume(case, shape, params["seed"]), root / image)
        report, closed, yn = write_case_texts(case, image, params["seed"])
        write_atomic(root / text, (report + "\n").encode("ascii"))
        cap[split].append({"image": image, "text": text})
        vqa[split].extend(closed)
        yes_no[split].extend(yn)
    write_atomic(root / layout.CAP_JSON, json_bytes(cap, ensure_ascii=True))
    for split in layout.CAP_SPLITS:
        vqa_dir = root / layout.VQA_DIR
        write_atomic(vqa_dir / layout.VQA_CSV[split], csv_bytes(layout.VQA_COLUMNS, vqa[split]))
        write_atomic(vqa_dir / layout.VQA_YN_CSV[split], csv_bytes(layout.VQA_YN_COLUMNS, yes_no[split]))

    _remove_stale(root, old_files - set(files))
    write_preprocessing(root, phantom_preprocessing(shape))
    marker["complete"] = True
    marker["files"] = files
    marker["counts"] = {
        "cases": sizes,
        "vqa": {s: len(vqa[s]) for s in layout.CAP_SPLITS},
        "yes_no": {s: len(yes_no[s]) for s in layout.CAP_SPLITS},
    }
    write_atomic(root / MARKER_NAME, json_bytes(marker, ensure_ascii=True))
    return _dataset(root, marker, generated=True)


def _remove_stale(root: Path, stale: set[str]) -> None:
    """Delete files only a previous phantom dataset wrote, and folders left empty by that."""
    resolved_root = root.resolve()
    for relative in sorted(stale):
        path = (root / relative).resolve()
        if resolved_root not in path.parents:
            continue  # never follow a marker outside the root
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == resolved_root:
                break
            try:
                parent.rmdir()
            except OSError:
                break


def _dataset(root: Path, marker: dict, generated: bool) -> PhantomDataset:
    params, counts = marker["params"], marker["counts"]
    return PhantomDataset(
        root=root,
        num_cases=params["num_cases"],
        shape=tuple(params["shape"]),
        seed=params["seed"],
        volume_format=params["volume_format"],
        split_cases=dict(counts["cases"]),
        split_vqa=dict(counts["vqa"]),
        split_yes_no=dict(counts["yes_no"]),
        generated=generated,
    )


def ensure_phantom_dataset(
    root: str | os.PathLike,
    num_cases: int = DEFAULT_NUM_CASES,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    volume_format: str = "nii.gz",
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
) -> PhantomDataset:
    """Generate the dataset only if ``root`` does not already hold it (generate-once for configs).

    "Holds it" means a marker with the same generator version and parameters and every file it
    lists present. Concurrent callers (e.g. several ranks) write identical bytes via atomic
    replaces, so racing is wasteful but safe.
    """
    params = _normalise_params(num_cases, shape, seed, volume_format, split_fractions)
    root = Path(root)
    marker = read_phantom_marker(root)
    if (
        marker is not None
        and marker.get("version") == GENERATOR_VERSION
        and marker.get("complete") is True
        and marker.get("params") == params
        and all((root / f).is_file() for f in marker.get("files", []))
    ):
        return _dataset(root, marker, generated=False)
    return make_phantom_dataset(root, overwrite=overwrite, **params)
