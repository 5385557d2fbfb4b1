"""The epoch plan and the transforms: pure functions, no services."""

import pytest
import torch
from pydantic import ValidationError

from cluster.data.loader import plan_epoch
from cluster.data.manifest import ShardInfo
from cluster.data.transforms import AugmentSpec, batch_mixer, eval_transform, train_transform

SHARDS = tuple(
    ShardInfo(url=f"s3://b/train-{i:06d}.tar", samples=n, bytes=1000, sha256="0" * 64)
    for i, n in enumerate([50, 50, 48, 47, 50, 12, 50, 49, 33, 50])
)


def _samples(plan) -> list[tuple[str, int]]:
    return [(piece.shard.url, index)
            for slot in plan.slots for piece in slot for index in range(piece.start, piece.stop)]


@pytest.mark.parametrize("num_slots", [1, 3, 4, 12, 439])
def test_plan_deals_every_sample_once_in_slots_of_equal_size(num_slots: int) -> None:
    plan = plan_epoch(SHARDS, epoch=0, seed=1, num_slots=num_slots, batch_size=8, shuffle=True)
    assert sorted(_samples(plan)) == sorted((s.url, i) for s in SHARDS for i in range(s.samples))
    totals = [plan.slot_samples(i) for i in range(num_slots)]
    assert max(totals) - min(totals) <= 1  # more slots than shards too: a slot may be part of one
    assert plan.batches_per_slot == -(-max(totals) // 8)


def test_equal_slots_take_the_fewest_steps_the_data_allows() -> None:
    # 439 samples over 2 ranks: 220 at most per rank, 14 batches of 16. Whole shards, each dealt to
    # the lighter rank, gave one rank 242 with this seed: 16 batches, 2 of them padding.
    assert plan_epoch(SHARDS, epoch=0, seed=0, num_slots=2, batch_size=16, shuffle=True).batches_per_slot == 14


def test_a_slot_reads_whole_shards_but_at_its_ends() -> None:
    plan = plan_epoch(SHARDS, epoch=3, seed=7, num_slots=4, batch_size=8, shuffle=True)
    for slot in plan.slots:
        inner = slot[1:-1]
        assert all(piece.start == 0 and piece.stop == piece.shard.samples for piece in inner)
        assert slot[0].stop == slot[0].shard.samples or len(slot) == 1  # ends where its neighbour's starts
        assert slot[-1].start == 0 or len(slot) == 1


def test_plan_is_a_function_of_seed_and_epoch() -> None:
    def layout(epoch: int, seed: int) -> list:
        plan = plan_epoch(SHARDS, epoch=epoch, seed=seed, num_slots=3, batch_size=8, shuffle=True)
        return [[(p.shard.url, p.start, p.stop) for p in slot] for slot in plan.slots]

    assert layout(0, 1) == layout(0, 1)
    assert layout(0, 1) != layout(1, 1)
    assert layout(0, 1) != layout(0, 2)
    unshuffled = plan_epoch(SHARDS, epoch=5, seed=9, num_slots=1, batch_size=8, shuffle=False)
    assert [(p.shard.url, p.start, p.stop) for p in unshuffled.slots[0]] == [(s.url, 0, s.samples) for s in SHARDS]


def test_too_few_samples_names_the_numbers_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"439 samples but ranks × loader workers = 440.*fewer workers"):
        plan_epoch(SHARDS, epoch=0, seed=0, num_slots=440, batch_size=8, shuffle=True)


@pytest.mark.parametrize("augment", [AugmentSpec(), AugmentSpec(policy="autoaugment", random_erasing=0.5),
                                     AugmentSpec(random_resized_crop=False, horizontal_flip=False)])
def test_train_transform_gives_normalised_images_at_the_resolution(augment: AugmentSpec) -> None:
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    out = train_transform(24, augment)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert -3 < out.mean() < 3


def test_eval_transform_resizes_then_center_crops() -> None:
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, :, 90:110] = 255  # a bright band in the middle survives the center crop
    out = eval_transform(32)(image)
    assert out.shape == (3, 32, 32)
    assert out[:, :, 16].mean() > out[:, :, 0].mean()


def test_batch_mixer_is_off_unless_asked() -> None:
    assert batch_mixer(AugmentSpec(), 10) is None
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, soft = batch_mixer(AugmentSpec(mixup_alpha=0.4), 10)(images, labels)
    assert mixed.shape == images.shape and soft.shape == (4, 10)


def test_augment_spec_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="random_erasing"):
        AugmentSpec(random_erasing=2.0)
    with pytest.raises(ValidationError, match="policy"):
        AugmentSpec(policy="trivialaugment")
