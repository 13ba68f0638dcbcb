"""Volumes for ``predict``: read and preprocessed in DataLoader workers, bad ones turned into records.

:class:`VolumeReader` reads one input as :func:`med3dvlm.api.model_input` does (any accepted format,
the model's preprocessing for raw CT, resized to the model's size). Whatever goes wrong with one
volume (missing, corrupt, several DICOM series, a constant volume) becomes a :class:`BadInput`
naming the input and the reason, so one bad scan never stops a batch of thousands.

:class:`PredictionDataModule` plans the run: the inputs still missing from ``out`` (what a resumed
run skips is decided here, on every rank, after rank 0 has merged the shards a killed run left), and
this rank's share of them: pending input ``i`` goes to rank ``i % world_size``, so every input is
read by exactly one rank (no padding repeats, unlike a ``DistributedSampler``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from med3dvlm.data.preprocessing import Preprocessing
from med3dvlm.predicting.inputs import Question


@dataclass(frozen=True)
class PendingInput:
    """One volume to read and the questions still to answer about it (one for report/embed/zero_shot)."""

    position: int  # in the run's input list: merged rows keep this order
    path: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class BadInput:
    """An input that could not become model input, and why (the error's type and message)."""

    path: str
    reason: str

    def record(self) -> dict[str, str]:
        return {"input": self.path, "reason": self.reason}


@dataclass
class VolumeBatch:
    """A collated batch: the volumes read, ``(B, 1, D, H, W)``, and the inputs that failed."""

    inputs: list[PendingInput]
    volumes: torch.Tensor | None
    read_seconds: list[float]
    bad: list[BadInput] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs) + len(self.bad)


def describe_error(error: BaseException) -> str:
    """``"<Type>: <message>"`` on one line (a several-series listing joined by ``;``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {'; '.join(lines) or 'no message'}"


class VolumeReader(Dataset):
    """``pending[i]`` read as model input; a failure is returned as a :class:`BadInput`, not raised."""

    def __init__(
        self, pending: Sequence[PendingInput], image_size: Sequence[int] | None, preprocessing: Preprocessing | None
    ) -> None:
        self.pending = list(pending)
        self.image_size = None if image_size is None else tuple(int(n) for n in image_size)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, index: int) -> tuple[PendingInput, torch.Tensor | BadInput, float]:
        from med3dvlm.api import model_input

        item = self.pending[index]
        start = time.perf_counter()
        try:
            volume: torch.Tensor | BadInput = model_input(item.path, self.image_size, self.preprocessing)
        except Exception as error:  # noqa: BLE001 - any failure of one volume is reported, never fatal
            volume = BadInput(item.path, describe_error(error))
        return item, volume, time.perf_counter() - start


def collate_volumes(items: list[tuple[PendingInput, torch.Tensor | BadInput, float]]) -> VolumeBatch:
    good = [(item, volume, seconds) for item, volume, seconds in items if isinstance(volume, torch.Tensor)]
    bad = [volume for _, volume, _ in items if isinstance(volume, BadInput)]
    # default_collate stacks straight into shared memory in a worker: no copy on the way to the model
    volumes = default_collate([volume for _, volume, _ in good]) if good else None
    return VolumeBatch([item for item, _, _ in good], volumes, [seconds for _, _, seconds in good], bad)


def share_of_rank(pending: Sequence[PendingInput], rank: int, world_size: int) -> list[PendingInput]:
    """Pending input ``i`` belongs to rank ``i % world_size``."""
    return [item for index, item in enumerate(pending) if index % world_size == rank]


class PredictionDataModule(L.LightningDataModule):
    """The run's inputs as this rank's DataLoader; ``output`` (a ``PredictionOutput``) knows what is done.

    ``prepare_data`` (global rank 0 only, before the others plan) opens ``out``: checks its settings,
    merges shards a killed run left. ``setup`` (every rank) reads which rows ``out`` holds.
    """

    def __init__(
        self,
        inputs: Sequence[str],
        questions: Sequence[Question],
        output,
        image_size: Sequence[int] | None,
        preprocessing: Preprocessing | None,
        batch_size: int = 4,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: give a positive number of volumes per batch")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: give 0 (read in the main process) or more")
        self.prepare_data_per_node = False  # out is one file on a shared file system
        self.inputs = list(inputs)
        self.questions = tuple(questions)
        self.output = output
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pending: list[PendingInput] = []
        self.local: list[PendingInput] = []

    def prepare_data(self) -> None:
        self.output.prepare()

    def plan(self, done_ids: set[str]) -> list[PendingInput]:
        """Every input with the questions whose rows ``out`` lacks, in input order."""
        pending = []
        for position, path in enumerate(self.inputs):
            missing = tuple(q for q in self.questions if self.output.row_id(path, q) not in done_ids)
            if missing:
                pending.append(PendingInput(position, path, missing))
        return pending

    def setup(self, stage: str) -> None:
        self.pending = self.plan(self.output.done_ids())
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.local = share_of_rank(self.pending, rank, world_size)

    def transfer_batch_to_device(self, batch: VolumeBatch, device: torch.device, dataloader_idx: int) -> VolumeBatch:
        if batch.volumes is not None:
            batch.volumes = batch.volumes.to(device, non_blocking=True)
        return batch

    def predict_dataloader(self) -> DataLoader:
        from med3dvlm.api import import_readers

        pin = bool(self.trainer and self.trainer.strategy.root_device.type == "cuda")
        if self.num_workers:
            import_readers()  # once here, before the workers fork, not once in each
        return DataLoader(
            VolumeReader(self.local, self.image_size, self.preprocessing),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_volumes,
            pin_memory=pin,
        )
