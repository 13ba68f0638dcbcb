"""Datasets and LightningDataModules over M3D-Cap and M3D-VQA samples.

A batch from the default collate (``collate_samples``) is a dict:
``image`` FloatTensor ``(B, 1, D, H, W)``; ``prompt``, ``answer``, ``task``, ``question_type``,
``answer_choice``, ``image_path``, ``source``: lists of length B (``question_type`` /
``answer_choice`` entries may be None). Stages that need token ids pass their own ``collate_fn``
(a picklable callable ``list[dict] -> batch``, e.g. an instance of a module-level class holding the
tokenizer, so worker processes can receive it). It gets the per-sample dicts above, with ``None``
for a skipped sample; ``drop_skipped`` removes those.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from med3dvlm.data.sampling import EpochIndex, ResumableDataLoader, ResumableSampler, sample_seed

from med3dvlm.data.errors import DataError
from med3dvlm.data.layout import ALL_QUESTION_TYPES, CLOSED_ANSWER_FORMAT, check_closed_answer_format
from med3dvlm.data.m3d import OnBadSample, SkippedSample, check_on_bad_sample
from med3dvlm.data.tasks import read_task_split
from med3dvlm.data.samples import TASKS, Sample
from med3dvlm.data.transforms import IMAGE_KEY, eval_transforms, train_transforms
from med3dvlm.data.volumes import load_volume, with_volume_format

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
TEXT_KEYS = ("prompt", "answer", "task", "question_type", "answer_choice", "image_path", "source")
BATCH_KEYS = (IMAGE_KEY, *TEXT_KEYS, "epoch")

# SPEC §5: stage 2 (projector pretraining) trains on reports + closed + open VQA;
# stage 3 (fine-tuning) adds the yes/no questions.
PRETRAIN_TASKS = ("caption", "vqa_closed", "vqa_open")
FINETUNE_TASKS = (*PRETRAIN_TASKS, "vqa_yes_no")
VQA_TASK_BY_MODE = {"closed": "vqa_closed", "open": "vqa_open", "yes_no": "vqa_yes_no"}

Collate = Callable[[list[dict[str, Any] | None]], Any]


class VolumeTextDataset(Dataset):
    """Loads each sample's volume and pairs it with its text.

    With ``on_bad_sample="skip"`` a volume that fails to load yields ``None`` (dropped by the
    collate), is logged and counted in ``skipped``. The count is per process: with worker
    processes each worker counts its own, so the log lines are the complete record.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        on_bad_sample: OnBadSample = "error",
        augmentation_seed: int | None = None,
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        self.samples = list(samples)
        self.augmentation_seed = augmentation_seed
        self.transform = transform if transform is not None else eval_transforms()
        self.on_bad_sample = on_bad_sample
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | EpochIndex) -> dict[str, Any] | None:
        """``key`` is an index, or an :class:`EpochIndex` from a resumable sampler, in which case the
        augmentation is seeded from (``augmentation_seed``, epoch, index) for exact resumption."""
        if isinstance(key, tuple):
            epoch, index = key
            if self.augmentation_seed is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=sample_seed(self.augmentation_seed, epoch, index))
        else:
            epoch, index = 0, key
        sample = self.samples[index]
        try:
            volume = load_volume(sample.image_path)
        except DataError as exc:
            if self.on_bad_sample == "error":
                raise type(exc)(f"{exc} (sample {sample.source})") from exc
            self.skipped += 1
            logger.warning("skipping sample %s: %s (%d skipped in this process)", sample.source, exc, self.skipped)
            return None
        image = self.transform({IMAGE_KEY: volume})[IMAGE_KEY]
        return {
            IMAGE_KEY: image,
            "prompt": sample.prompt,
            "answer": sample.answer,
            "task": sample.task,
            "question_type": sample.question_type,
            "answer_choice": sample.answer_choice,
            "image_path": str(sample.image_path),
            "source": sample.source,
            "epoch": epoch,
        }


def drop_skipped(items: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The items that loaded; skipped samples arrive as ``None``."""
    return [item for item in items if item is not None]


def collate_samples(items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack images to ``(B, 1, D, H, W)``, keep every other key as a list.

    Returns ``None`` when every sample of the batch was skipped; training steps should skip such
    a batch.
    """
    kept = drop_skipped(items)
    if not kept:
        return None
    images = [item[IMAGE_KEY] for item in kept]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"volumes in one batch differ in shape {sorted(shapes)} "
            f"(samples {[item['source'] for item in kept]}); set spatial_size to resize them"
        )
    batch: dict[str, Any] = {IMAGE_KEY: torch.stack(images)}
    for key in kept[0]:
        if key != IMAGE_KEY:
            batch[key] = [item[key] for item in kept]
    return batch


def seed_worker_transforms(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream.

    Without it every worker inherits the same MONAI random state and they augment in lockstep.
    ``worker_info.seed`` derives from torch's seed, so runs stay reproducible under
    ``seed_everything``.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=info.seed % 2**32)


class MixtureDataModule(L.LightningDataModule):
    """Samples of one or more tasks, concatenated per split, under one data root.

    ``tasks`` picks from ``caption`` (M3D-Cap JSON), ``vqa_closed``, ``vqa_open`` (the M3D-VQA
    CSVs) and ``vqa_yes_no`` (the yes/no CSVs). The paper's VLM stages use
    ``PRETRAIN_TASKS`` = caption + closed + open (stage 2) and ``FINETUNE_TASKS`` which adds yes/no
    (stage 3), SPEC §5. Splits are train / validation / test; train is augmented (SPEC §6) and
    shuffled. ``max_samples`` keeps the first N samples of each task in each split, for quick runs;
    a mapping ``{task: N}`` caps only the tasks it names (a smaller share of one task in a mixture).
    ``collate_fn`` is the stages' tokenisation hook (default ``collate_samples``). ``seed`` fixes
    the augmentation stream; by default it follows torch's seed (``seed_everything``).
    ``test_tasks`` (default: ``tasks``) are the tasks of the test split, e.g. only ``vqa_closed``
    when testing scores the closed questions alone. ``train_question_types`` (e.g. ``[Plane, Phase]``;
    default all) keeps only VQA questions of those types in the train and validation splits; the test
    split keeps every type, so its accuracy per type shows what training left out.
    ``closed_answer_format`` rewrites the closed answers of every split (default SPEC §6's
    ``"{letter}. {answer}"``), e.g. ``"{answer} ({letter}.)"``: the finding first, then its letter. Records skipped while reading are kept in
    ``skipped_records[split]``. ``volume_format`` (``nii.gz``, ``nii``, ``npy``; None = as listed)
    reads each listed volume's sibling of that format instead, e.g. ``nii`` for the fast uncompressed copies (``med3dvlm.data.volumes``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        tasks: Sequence[str] = PRETRAIN_TASKS,
        batch_size: int = 2,
        num_workers: int = 0,
        spatial_size: Sequence[int] | None = None,
        augmentation: dict[str, float] | None = None,
        on_bad_sample: OnBadSample = "error",
        collate_fn: Collate | None = None,
        max_samples: int | Mapping[str, int] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int | None = None,
        volume_format: str | None = None,
        test_tasks: Sequence[str] | None = None,
        train_question_types: Sequence[str] | None = None,
        closed_answer_format: str = CLOSED_ANSWER_FORMAT,
    ) -> None:
        super().__init__()
        check_on_bad_sample(on_bad_sample)
        with_volume_format("volume.nii.gz", volume_format)  # a misspelt format fails here, not at setup
        tasks = tuple(tasks)
        unknown = [task for task in tasks if task not in TASKS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names from {TASKS}, got {list(tasks)}")
        test_tasks = tasks if test_tasks is None else tuple(test_tasks)
        unknown = [task for task in test_tasks if task not in TASKS]
        if not test_tasks or unknown or len(set(test_tasks)) != len(test_tasks):
            raise ValueError(f"test_tasks must be distinct names from {TASKS} (or null), got {list(test_tasks)}")
        caps = dict(max_samples) if isinstance(max_samples, Mapping) else {task: max_samples for task in TASKS}
        if any(cap is not None and (not isinstance(cap, int) or cap < 1) for cap in caps.values()):
            raise ValueError(f"max_samples must be a positive int, a mapping task -> positive int, or None; got {max_samples}")
        if any(task not in TASKS for task in caps):
            raise ValueError(f"max_samples names unknown tasks {sorted(set(caps) - set(TASKS))}; tasks are {TASKS}")
        if train_question_types is not None:
            train_question_types = tuple(train_question_types)
            names = ALL_QUESTION_TYPES
            unknown = [kind for kind in train_question_types if kind not in names]
            if not train_question_types or unknown:
                raise ValueError(f"train_question_types must be names from {names} (or null), got {list(train_question_types)}")
        self.train_question_types = train_question_types
        self.closed_answer_format = check_closed_answer_format(closed_answer_format)
        self.root = Path(root)
        self.tasks = tasks
        self.test_tasks = test_tasks
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.spatial_size = None if spatial_size is None else tuple(int(edge) for edge in spatial_size)
        # overrides of train_transforms' probabilities (rotate_prob, flip_prob, scale_prob, shift_prob)
        self.augmentation = dict(augmentation or {})
        self.on_bad_sample = on_bad_sample
        self.collate_fn = collate_fn if collate_fn is not None else collate_samples
        self.max_samples = max_samples
        self._caps = caps
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.volume_format = volume_format
        self.datasets: dict[str, VolumeTextDataset] = {}
        self.skipped_records: dict[str, list[SkippedSample]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read the splits ``stage`` needs (all three when ``stage`` is None)."""
        splits_by_stage = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}
        splits_by_stage["predict"] = splits_by_stage["test"]
        for split in splits_by_stage.get(stage, SPLITS):
            self.dataset(split)

    def dataset(self, split: str) -> VolumeTextDataset:
        """The dataset of ``split``, read on first use."""
        if split not in self.datasets:
            self.datasets[split] = self._build_dataset(split)
        return self.datasets[split]

    def _build_dataset(self, split: str) -> VolumeTextDataset:
        samples: list[Sample] = []
        skipped: list[SkippedSample] = []
        for task in self.test_tasks if split == "test" else self.tasks:
            result = read_task_split(
                self.root, task, split, self.on_bad_sample, self.volume_format, self.closed_answer_format
            )
            kept = result.samples
            if self.train_question_types is not None and split != "test" and task.startswith("vqa"):
                kept = [sample for sample in kept if sample.question_type in self.train_question_types]
                logger.info(
                    "%s %s: kept %d of %d questions (types %s)",
                    task, split, len(kept), len(result.samples), ", ".join(self.train_question_types),
                )
            samples.extend(kept[: self._caps.get(task)])
            skipped.extend(result.skipped)
        self.skipped_records[split] = skipped
        if split == "train":
            transform = train_transforms(self.spatial_size, seed=self._seed(), **self.augmentation)
        else:
            transform = eval_transforms(self.spatial_size)
        return VolumeTextDataset(samples, transform, self.on_bad_sample, augmentation_seed=self._seed())

    def _seed(self) -> int:
        return self.seed if self.seed is not None else torch.initial_seed() % 2**32

    def _loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        return ResumableDataLoader(
            dataset,
            sampler=ResumableSampler(len(dataset), seed=self._seed(), shuffle=split == "train"),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=seed_worker_transforms,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class M3DCapDataModule(MixtureDataModule):
    """M3D-Cap image-report pairs (stage 1, contrastive alignment). Options as ``MixtureDataModule``."""

    def __init__(self, root: str | os.PathLike, **options: Any) -> None:
        super().__init__(root, tasks=("caption",), **options)


class M3DVQADataModule(MixtureDataModule):
    """One kind of M3D-VQA question: ``mode`` is ``closed``, ``open`` or ``yes_no``.

    Options as ``MixtureDataModule``.
    """

    def __init__(self, root: str | os.PathLike, mode: str = "closed", **options: Any) -> None:
        if mode not in VQA_TASK_BY_MODE:
            raise ValueError(f"mode must be one of {tuple(VQA_TASK_BY_MODE)}, got {mode!r}")
        super().__init__(root, tasks=(VQA_TASK_BY_MODE[mode],), **options)
        self.mode = mode
