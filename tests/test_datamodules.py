"""Transforms (SPEC §6 augmentation) and one batch from every DataModule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

from med3dvlm.data import (
    FINETUNE_TASKS,
    M3DCapDataModule,
    M3DVQADataModule,
    MixtureDataModule,
    drop_skipped,
    eval_transforms,
    train_transforms,
)
from med3dvlm.data.datamodules import BATCH_KEYS

SHAPE = (1, 8, 16, 16)


def random_volume(seed=0):
    return np.random.default_rng(seed).random(SHAPE, dtype=np.float32)


# ------------------------------------------------------------------ transforms


def test_train_transforms_are_the_spec_augmentation():
    steps = train_transforms().transforms

    expected = [RandRotate90d, RandFlipd, RandFlipd, RandFlipd, RandScaleIntensityd, RandShiftIntensityd]
    assert [type(step) for step in steps[:6]] == expected
    rotate, flips, scale, shift = steps[0], steps[1:4], steps[4], steps[5]
    assert rotate.prob == 0.5 and rotate.spatial_axes == (1, 2)
    assert [flip.prob for flip in flips] == [0.1, 0.1, 0.1]
    assert [flip.flipper.spatial_axis for flip in flips] == [0, 1, 2]
    assert scale.prob == 0.5 and scale.scaler.factors == (-0.1, 0.1)
    assert shift.prob == 0.5 and shift.shifter.offsets == (-0.1, 0.1)


def test_eval_transforms_only_convert_type():
    volume = random_volume()
    image = eval_transforms()({"image": volume})["image"]
    assert type(image) is torch.Tensor and not isinstance(image, MetaTensor)
    assert image.dtype == torch.float32 and image.shape == SHAPE
    assert torch.equal(image, torch.from_numpy(volume))


@pytest.mark.parametrize("make", [train_transforms, eval_transforms])
def test_spatial_size_resizes_first(make):
    image = make((4, 8, 8))({"image": random_volume()})["image"]
    assert image.shape == (1, 4, 8, 8) and image.dtype == torch.float32


@pytest.mark.parametrize("seed", range(5))
def test_forced_intensity_augmentation_stays_within_spec_bounds(seed):
    volume = random_volume(seed)
    augment = train_transforms(rotate_prob=1.0, flip_prob=1.0, scale_prob=1.0, shift_prob=1.0, seed=seed)
    image = augment({"image": volume})["image"]

    assert image.shape == SHAPE and image.dtype == torch.float32
    # Rotations and flips only permute voxels, so sorted output = sorted input * (1 + f) + o.
    before = np.sort(volume.reshape(-1)).astype(np.float64)
    after = np.sort(image.numpy().reshape(-1)).astype(np.float64)
    scale, offset = np.polyfit(before, after, 1)
    assert np.allclose(after, scale * before + offset, atol=1e-5)
    assert 0.9 - 1e-6 <= scale <= 1.1 + 1e-6  # SPEC §6: +-10 %
    assert -0.1 - 1e-6 <= offset <= 0.1 + 1e-6  # SPEC §6: +-0.1


def test_forced_rotation_turns_the_h_w_plane():
    volume = random_volume()
    augment = train_transforms(rotate_prob=1.0, flip_prob=0.0, scale_prob=0.0, shift_prob=0.0, seed=3)
    turns = set()
    for _ in range(12):
        image = augment({"image": volume})["image"].numpy()
        matches = [k for k in (1, 2, 3) if np.array_equal(image, np.rot90(volume, k, axes=(2, 3)))]
        assert len(matches) == 1
        turns.add(matches[0])
    assert len(turns) > 1


def test_forced_flips_flip_all_three_axes():
    volume = random_volume()
    augment = train_transforms(rotate_prob=0.0, flip_prob=1.0, scale_prob=0.0, shift_prob=0.0)
    image = augment({"image": volume})["image"].numpy()
    assert np.array_equal(image, volume[:, ::-1, ::-1, ::-1])


def test_train_transforms_with_zero_probabilities_are_identity():
    volume = random_volume()
    augment = train_transforms(rotate_prob=0.0, flip_prob=0.0, scale_prob=0.0, shift_prob=0.0)
    assert torch.equal(augment({"image": volume})["image"], torch.from_numpy(volume))


# ------------------------------------------------------------------ DataModules


def check_batch(batch, size, shape=(8, 16, 16)):
    assert set(batch) == set(BATCH_KEYS)
    assert batch["image"].shape == (size, 1, *shape) and batch["image"].dtype == torch.float32
    for key in BATCH_KEYS[1:]:
        assert isinstance(batch[key], list) and len(batch[key]) == size


def test_cap_datamodule_batches(tiny_m3d_root):
    datamodule = M3DCapDataModule(tiny_m3d_root, batch_size=2, seed=0)
    datamodule.setup("fit")

    assert sorted(datamodule.datasets) == ["train", "validation"]
    train = next(iter(datamodule.train_dataloader()))
    check_batch(train, 2)
    assert set(train["task"]) == {"caption"}
    assert all(answer.startswith("Findings for case") for answer in train["answer"])
    validation = next(iter(datamodule.val_dataloader()))
    check_batch(validation, 2)
    assert validation["source"] == ["M3D_Cap.json:validation[0]", "M3D_Cap.json:validation[1]"]
    assert len(datamodule.test_dataloader().dataset) == 2


@pytest.mark.parametrize("mode, task", [("closed", "vqa_closed"), ("open", "vqa_open"), ("yes_no", "vqa_yes_no")])
def test_vqa_datamodule_batches(tiny_m3d_root, mode, task):
    datamodule = M3DVQADataModule(tiny_m3d_root, mode=mode, batch_size=2, max_samples=3)
    batch = next(iter(datamodule.val_dataloader()))

    check_batch(batch, 2)
    assert set(batch["task"]) == {task}
    assert len(datamodule.datasets["validation"]) == (2 if mode == "yes_no" else 3)


def test_mixture_concatenates_tasks_and_limits_each(tiny_m3d_root):
    datamodule = MixtureDataModule(
        tiny_m3d_root, tasks=FINETUNE_TASKS, batch_size=4, max_samples=1, spatial_size=(4, 8, 8)
    )
    datamodule.setup("fit")

    samples = datamodule.datasets["train"].samples
    assert [s.task for s in samples] == ["caption", "vqa_closed", "vqa_open", "vqa_yes_no"]
    batch = next(iter(datamodule.train_dataloader()))
    check_batch(batch, 4, shape=(4, 8, 8))
    assert sorted(batch["task"]) == sorted(FINETUNE_TASKS)


def test_mixture_rejects_unknown_tasks(tiny_m3d_root):
    with pytest.raises(ValueError, match="tasks"):
        MixtureDataModule(tiny_m3d_root, tasks=["caption", "vqa"])
    with pytest.raises(ValueError, match="test_tasks"):
        MixtureDataModule(tiny_m3d_root, tasks=["caption"], test_tasks=["vqa"])


def test_mixture_test_tasks_choose_the_test_split_only(tiny_m3d_root):
    datamodule = MixtureDataModule(tiny_m3d_root, tasks=FINETUNE_TASKS, test_tasks=["vqa_closed"], max_samples=1)
    datamodule.setup(None)

    assert [s.task for s in datamodule.datasets["test"].samples] == ["vqa_closed"]
    assert [s.task for s in datamodule.datasets["validation"].samples] == list(FINETUNE_TASKS)
    assert [s.task for s in datamodule.datasets["train"].samples] == list(FINETUNE_TASKS)


def test_train_question_types_filter_train_and_validation_but_not_test(tiny_m3d_root, caplog):
    datamodule = MixtureDataModule(
        tiny_m3d_root, tasks=["caption", "vqa_closed", "vqa_yes_no"], train_question_types=["Plane"]
    )
    with caplog.at_level("INFO", logger="med3dvlm.data.datamodules"):
        datamodule.setup(None)
    for split in ("train", "validation"):
        samples = datamodule.datasets[split].samples
        cases = len([s for s in samples if s.task == "caption"])
        # the fixture: one plane + one organ question per case, yes/no questions are type 4
        assert [s.question_type for s in samples if s.task == "vqa_closed"] == ["Plane"] * cases
        assert not [s for s in samples if s.task == "vqa_yes_no"]
    test_types = sorted({s.question_type for s in datamodule.datasets["test"].samples if s.task == "vqa_closed"})
    assert test_types == ["Organ", "Plane"]  # the test scores every type
    assert "vqa_closed train: kept" in caplog.text
    with pytest.raises(ValueError, match="train_question_types"):
        MixtureDataModule(tiny_m3d_root, tasks=["vqa_closed"], train_question_types=["plane"])


def test_closed_answer_format_rewrites_closed_answers_of_every_split(tiny_m3d_root):
    spec = MixtureDataModule(tiny_m3d_root, tasks=["vqa_closed", "vqa_open"])
    answer_first = MixtureDataModule(
        tiny_m3d_root, tasks=["vqa_closed", "vqa_open"], closed_answer_format="{answer} ({letter}.)"
    )
    for split in ("train", "validation", "test"):
        before, after = spec.dataset(split).samples, answer_first.dataset(split).samples
        # the fixture's CSV rows: plane (answer Axial, letter A) and organ (Kidney, B) per case
        assert [s.answer for s in before if s.task == "vqa_closed"][:2] == ["A. Axial", "B. Kidney"]
        assert [s.answer for s in after if s.task == "vqa_closed"][:2] == ["Axial (A.)", "Kidney (B.)"]
        # prompts, letters and open answers stay as read
        assert [(s.prompt, s.answer_choice) for s in after] == [(s.prompt, s.answer_choice) for s in before]
        assert [s.answer for s in after if s.task == "vqa_open"] == [s.answer for s in before if s.task == "vqa_open"]
    for bad in ("{answer} ({letter})", "{letter}. {answer} {extra}", "{letter}.", "{letter}. {answer"):
        with pytest.raises(ValueError, match="closed answer format"):
            MixtureDataModule(tiny_m3d_root, tasks=["vqa_closed"], closed_answer_format=bad)


def test_max_samples_mapping_caps_only_the_tasks_it_names(tiny_m3d_root):
    full = MixtureDataModule(tiny_m3d_root, tasks=["vqa_closed", "vqa_yes_no"])
    capped = MixtureDataModule(tiny_m3d_root, tasks=["vqa_closed", "vqa_yes_no"], max_samples={"vqa_yes_no": 2})
    for split in ("train", "test"):
        every = full.dataset(split).samples
        kept = capped.dataset(split).samples
        assert [s for s in kept if s.task == "vqa_closed"] == [s for s in every if s.task == "vqa_closed"]
        assert [s for s in kept if s.task == "vqa_yes_no"] == [s for s in every if s.task == "vqa_yes_no"][:2]
    for bad in ({"vqa": 2}, {"vqa_yes_no": 0}, 0):
        with pytest.raises(ValueError, match="max_samples"):
            MixtureDataModule(tiny_m3d_root, tasks=["vqa_closed"], max_samples=bad)


class CountingCollate:
    """A stand-in for a stage's tokenising collate: module-level, so workers can unpickle it."""

    def __call__(self, items):
        items = drop_skipped(items)
        return {"n": len(items), "prompts": [item["prompt"] for item in items]}


def test_custom_collate_runs_in_a_worker_process(tiny_m3d_root):
    datamodule = M3DVQADataModule(tiny_m3d_root, mode="open", batch_size=3, num_workers=1, collate_fn=CountingCollate())
    batch = next(iter(datamodule.test_dataloader()))
    assert batch == {"n": 3, "prompts": ["What plane is this?", "Which organ is abnormal?", "What plane is this?"]}


def test_skip_mode_reports_skipped_records(tiny_m3d_root):
    (tiny_m3d_root / "reports/case2.txt").write_text("\n", encoding="utf-8")
    datamodule = M3DCapDataModule(tiny_m3d_root, on_bad_sample="skip")
    datamodule.setup("fit")

    assert [s.source for s in datamodule.datasets["train"].samples] == [
        "M3D_Cap.json:train[0]",
        "M3D_Cap.json:train[1]",
        "M3D_Cap.json:train[3]",
    ]
    assert [record.source for record in datamodule.skipped_records["train"]] == ["M3D_Cap.json:train[2]"]
    assert datamodule.skipped_records["validation"] == []


def test_loader_workers_do_not_augment_in_lockstep(tmp_path):
    from torch.utils.data import DataLoader

    from med3dvlm.data import Sample, VolumeTextDataset, collate_samples, save_volume
    from med3dvlm.data.datamodules import seed_worker_transforms

    path = save_volume(np.full((4, 8, 8), 0.5, dtype=np.float32), tmp_path / "flat.npy")
    samples = [Sample(path, "q", "a", "caption", f"s{i}") for i in range(4)]
    dataset = VolumeTextDataset(samples, train_transforms(scale_prob=1.0, shift_prob=1.0, seed=0))
    loader = DataLoader(dataset, num_workers=2, collate_fn=collate_samples, worker_init_fn=seed_worker_transforms)

    means = [batch["image"].mean().item() for batch in loader]
    # Workers 0 and 1 deliver items 0, 1 (then 2, 3); copied random states would make them equal.
    assert means[0] != means[1] and means[2] != means[3]


def test_augmentation_overrides_reach_the_training_transforms(tiny_m3d_root):
    module = M3DCapDataModule(tiny_m3d_root, augmentation={"rotate_prob": 0.0, "flip_prob": 0.0})
    steps = module.dataset("train").transform.transforms
    assert [t.prob for t in steps if isinstance(t, (RandRotate90d, RandFlipd))] == [0.0, 0.0, 0.0, 0.0]
    assert [t.prob for t in steps if isinstance(t, RandScaleIntensityd)] == [0.5]  # SPEC §6 default kept


def test_resumable_loader_continues_an_epoch_where_it_stopped(tiny_m3d_root):
    from med3dvlm.data.sampling import ResumableDataLoader

    def sources(loader):
        return [s for batch in loader for s in batch["source"]]

    module = M3DCapDataModule(tiny_m3d_root, batch_size=1, seed=3)
    loader = module.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    loader.sampler.set_epoch(1)
    full_epoch = sources(loader)
    assert sorted(full_epoch) == sorted(s.source for s in module.dataset("train").samples)

    # a consumer that trains on 2 batches, then dies
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed_samples": 2}

    resumed = M3DCapDataModule(tiny_m3d_root, batch_size=1, seed=3).train_dataloader()
    resumed.load_state_dict(state)
    assert sources(resumed) == full_epoch[2:]
