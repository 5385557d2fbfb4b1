"""The parts of the training loop that need no cluster: schedule, loss, models, strategies, EMA, progress."""

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

import effnet
from cluster.data.loader import Batch
from cluster.train.checkpoint import (
    EpochTally,
    Progress,
    latest_checkpoint,
    load_progress,
    new_checkpoint_dir,
    remove_unregistered,
    save_progress,
    upload_marker,
)
from cluster.train.config import DEEPSPEED_KEYS_FROM_THE_SPEC, ModelSpec, TrainingSpec
from cluster.train.loop import weighted_loss
from cluster.train.models import build_model, parameter_groups
from cluster.train.schedule import LrSchedule
from cluster.train.strategy import DDP, WeightEMA, deepspeed_config

DATA = {"train": {"manifest": "s3://shards/digits/manifest.json"}}


def _spec(**sections: object) -> TrainingSpec:
    return TrainingSpec.model_validate({"name": "unit", "data": DATA, **sections})


def _batch(images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> Batch:
    keys = tuple(f"k{i}" for i in range(len(labels)))
    return Batch(images, labels, weights, keys, ())


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    schedule = LrSchedule(peak=0.1, warmup_steps=10, total_steps=110, final_fraction=0.01)
    assert schedule(0) == pytest.approx(0.01) and schedule(9) == pytest.approx(0.1)
    assert schedule(60) == pytest.approx(0.001 + 0.099 * 0.5)  # half-way down the cosine
    assert schedule(110) == pytest.approx(0.001) and schedule(500) == pytest.approx(0.001)
    after_warmup = [schedule(step) for step in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(after_warmup))
    assert LrSchedule(peak=1.0, warmup_steps=0, total_steps=4, final_fraction=0.0)(0) == 1.0


def test_padding_and_bad_samples_add_nothing_to_the_loss() -> None:
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0])
    changed = logits.clone()
    changed[2:] = torch.randn(2, 10) * 100  # whatever padding holds
    loss = weighted_loss(logits, _batch(torch.zeros(4), labels, weights), label_smoothing=0.1)
    assert loss == weighted_loss(changed, _batch(torch.zeros(4), labels, weights), label_smoothing=0.1)
    expected = nn.functional.cross_entropy(logits[:2], labels[:2], label_smoothing=0.1, reduction="sum") / 4
    assert loss.item() == pytest.approx(expected.item())


def test_soft_labels_from_mixup_train_too() -> None:
    soft, logits = torch.softmax(torch.randn(3, 5), dim=1), torch.randn(3, 5)
    loss = weighted_loss(logits, _batch(torch.zeros(3), soft, torch.ones(3)), label_smoothing=0.0)
    expected = -(soft * torch.log_softmax(logits, dim=1)).sum() / 3  # cross-entropy against the soft targets
    assert loss.item() == pytest.approx(expected.item())


def test_accumulated_micro_steps_give_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    weights = torch.tensor([1.0] * 6 + [0.0] * 2)

    def trained(accumulation: int) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
        spec = _spec(optim={"grad_accumulation": accumulation, "optimizer": "sgd", "weight_decay": 0.0},
                     precision={"channels_last": False})
        strategy = DDP(model, spec, torch.device("cpu"))
        size = 8 // accumulation
        loss_fn = lambda logits, batch: weighted_loss(logits, batch, 0.0)
        for i in range(accumulation):
            part = slice(i * size, (i + 1) * size)
            strategy.micro_step(_batch(images[part], labels[part], weights[part]), loss_fn, sync=i == accumulation - 1)
        grads = [p.grad.clone() for p in model.parameters()]
        strategy.optimizer_step(lr=0.1)
        return grads

    for whole, accumulated in zip(trained(1), trained(2), strict=True):
        torch.testing.assert_close(accumulated, whole)


def test_optimizer_step_sets_the_learning_rate_and_clips() -> None:
    model = nn.Linear(4, 2)
    strategy = DDP(model, _spec(optim={"grad_clip_norm": 0.5, "optimizer": "sgd", "momentum": 0.0,
                                       "weight_decay": 0.0}, precision={"channels_last": False}), torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = lambda logits, batch: logits.pow(2).sum() * 1000  # a huge gradient
    strategy.micro_step(_batch(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3)), loss_fn, sync=True)
    strategy.optimizer_step(lr=0.01)
    assert strategy.optimizer.param_groups[0]["lr"] == 0.01
    step = torch.cat([(p.detach() - old).flatten() for p, old in zip(model.parameters(), before, strict=True)])
    assert step.norm() == pytest.approx(0.01 * 0.5, rel=1e-4)  # the gradient was clipped to norm 0.5


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = effnet.build("efficientnet_b0", num_classes=10)
    model.freeze(1)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) < len(list(model.parameters()))


def test_deepspeed_config_comes_from_the_spec_with_the_expert_override_merged() -> None:
    spec = _spec(strategy={"name": "deepspeed", "zero_stage": 3, "config": {"zero_optimization": {"overlap_comm": True},
                                                                             "steps_per_print": 10}},
                 precision={"dtype": "bf16"}, optim={"grad_accumulation": 2, "grad_clip_norm": 1.0},
                 scaling={"num_workers": 4}, data={**DATA, "batch_size": 8})
    config = deepspeed_config(spec, 4)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (8, 2, 64)
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["data_types"] == {"buffer_dtype": "bf16"} and config["gradient_clipping"] == 1.0
    assert config["steps_per_print"] == 10


def test_an_elastic_job_keeps_its_global_batch_on_fewer_workers_by_accumulating_more() -> None:
    spec = _spec(optim={"grad_accumulation": 2}, scaling={"num_workers": {"min": 1, "max": 3}},
                 data={**DATA, "batch_size": 8})
    assert spec.global_batch == 48 and [spec.accumulation_at(w) for w in (3, 2, 1)] == [2, 3, 6]  # 48 each
    assert _spec(scaling={"num_workers": {"min": 2, "max": 4}}).accumulation_at(3) == 2  # 2 × 3 = 6 ≥ 4: next larger
    fixed = _spec(strategy={"name": "deepspeed"}, optim={"grad_accumulation": 2}, scaling={"num_workers": 3},
                  data={**DATA, "batch_size": 8})
    assert deepspeed_config(fixed, 3)["train_batch_size"] == 48


def test_efficientnet_from_torchvision_weights_gets_a_new_head_and_frozen_stages(tmp_path: Path) -> None:
    reference = torchvision.models.efficientnet_b0()
    safetensors.torch.save_file(reference.state_dict(), tmp_path / "tv_b0.safetensors")
    spec = ModelSpec(arch="efficientnet_b0", num_classes=10, pretrained=str(tmp_path / "tv_b0.safetensors"),
                     freeze_through_stage=2, activation_checkpointing=True)
    model = build_model(spec)
    assert model.classifier.out_features == 10 and model.activation_checkpointing
    torch.testing.assert_close(model.stem.conv.weight, reference.features[0][0].weight)
    assert not any(p.requires_grad for p in model.stages[2].parameters())
    assert all(p.requires_grad for p in model.stages[3].parameters())


def test_the_batchnorm_momentum_of_the_spec_reaches_every_norm() -> None:
    model = build_model(ModelSpec(arch="efficientnet_b0", num_classes=10, bn_momentum=0.05))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 40 and {m.momentum for m in norms} == {0.05}


def test_torchvision_classifier_with_weights_for_other_classes(tmp_path: Path) -> None:
    torch.save(torchvision.models.mobilenet_v3_large(num_classes=1000).state_dict(), tmp_path / "mnv3.pth")
    model = build_model(ModelSpec(arch="mobilenet_v3_large", num_classes=7, pretrained=str(tmp_path / "mnv3.pth")))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="does not hold mobilenet_v3_large weights"):
        build_model(ModelSpec(arch="mobilenet_v3_large", num_classes=7, pretrained=str(tmp_path / "resnet18.pth")))


def test_ema_follows_the_weights_and_copies_statistics() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = WeightEMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, start + 0.1)
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((3,), 5.0))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_progress_round_trip_restores_each_ranks_random_state(tmp_path: Path) -> None:
    progress = Progress(epoch=2, step=17, optimizer_steps=90, tally=EpochTally(samples=250, loss_sum=99.5),
                        history=[{"epoch": 0, "val_top1": 0.5}, {"epoch": 1, "val_top1": 0.6}])
    torch.manual_seed(123)
    random.seed(4)
    save_progress(tmp_path, progress, rank=0, spec_json='{"name": "unit"}')
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    restored = load_progress(tmp_path, rank=0, world_size=1)
    assert (torch.rand(3).tolist(), random.random()) == (expected[0].tolist(), expected[1])
    assert restored.state() == progress.state() and restored.tally == progress.tally
    assert restored.name == "epoch0002-step0000017" and math.isclose(restored.tally.loss_sum, 99.5)


def test_resumed_on_fewer_or_more_ranks_the_epochs_tallies_stay_whole(tmp_path: Path) -> None:
    for rank in range(3):  # three ranks wrote the checkpoint
        save_progress(tmp_path, Progress(epoch=1, step=8, tally=EpochTally(samples=10 + rank, loss_sum=1.0),
                                         world_size=3), rank=rank, spec_json='{"name": "unit"}')
    two = [load_progress(tmp_path, rank=rank, world_size=2).tally for rank in range(2)]
    assert [t.samples for t in two] == [10 + 12, 11] and sum(t.loss_sum for t in two) == 3.0
    four = [load_progress(tmp_path, rank=rank, world_size=4) for rank in range(4)]
    assert [p.tally.samples for p in four] == [10, 11, 12, 0] and four[0].world_size == 3


def test_a_killed_workers_local_checkpoint_is_removed_by_the_next_one_on_its_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the killed worker's (a process that has ended)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # this one's
    worker = "from cluster.train.checkpoint import new_checkpoint_dir as n\n(n() / 'rank-0.pt').write_bytes(b'half')"
    subprocess.run([sys.executable, "-c", worker], check=True)
    assert len(list(tmp_path.iterdir())) == 1
    ours, still_uploading = new_checkpoint_dir(), new_checkpoint_dir()
    assert sorted(tmp_path.iterdir()) == sorted([ours, still_uploading])  # the dead process's is gone, ours kept
    unrelated = tmp_path / "compound-checkpoint-notes"
    unrelated.mkdir()
    new_checkpoint_dir()
    assert unrelated.is_dir()


def test_deepspeed_on_cpu_starts_without_building_its_shared_memory_op(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The op would take a minute of C++ compile on a fresh node, and training never uses it."""
    import deepspeed.comm.comm as deepspeed_comm
    import torch.distributed as dist

    from cluster.train.strategy import DeepSpeed

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        spec = _spec(strategy={"name": "deepspeed", "zero_stage": 2}, scaling={"num_workers": 1})
        DeepSpeed(effnet.build("efficientnet_b0", num_classes=10), spec, torch.device("cpu"))
        assert deepspeed_comm.cdb is not None and deepspeed_comm.cdb.shm_comm_op is None
    finally:
        deepspeed_comm.cdb = None
        dist.destroy_process_group()


def test_a_resumed_zero3_job_trains_on_after_validating_and_checkpointing(tmp_path: Path) -> None:
    """The fused BatchNorm + swish and squeeze-excite use their children's parameters without calling them.
    Undeclared, ZeRO-3 released them between forward and backward in a job resumed from a checkpoint:
    the first backward after validation failed on a 0-element BatchNorm weight, or ZeRO-3's trace broke.
    Each phase runs in a process of its own, as each attempt of a Ray Train worker does."""
    def run(phase: str) -> dict:
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("zero3_resume.py")), phase, str(tmp_path)],
                              check=False, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, resumed = run("first"), run("resumed")
    assert all(math.isfinite(loss) for loss in first["losses"] + resumed["losses"]) and len(resumed["losses"]) == 3
    assert resumed["trained"] == [True, True]  # the classifier, and a BatchNorm run fused


def test_a_run_ends_at_a_checkpoint_every_rank_uploaded_even_when_ray_never_registered_it(tmp_path: Path) -> None:
    # A worker killed after the last checkpoint's upload but before its registration: the restart resumes
    # from it with nothing left to train, so Ray's latest stays the one before. The run ends at the newer one.
    from pyarrow.fs import LocalFileSystem

    filesystem, run = LocalFileSystem(), str(tmp_path)
    # (An elastic job: its world was 3 workers, then 2.)
    for name, ranks, world in (("epoch0000-step0000040", 3, 3), ("epoch0001-step0000000", 2, 2),
                               ("epoch0001-step0000010", 1, 2)):
        (tmp_path / name).mkdir()
        for rank in range(ranks):
            (tmp_path / name / upload_marker(rank, world)).touch()
    registered = f"{run}/epoch0000-step0000040"

    final = latest_checkpoint(filesystem, run, registered)
    assert final == f"{run}/epoch0001-step0000000"  # the newest one half uploaded is not a checkpoint
    assert latest_checkpoint(filesystem, run, None) == final
    assert latest_checkpoint(filesystem, run, f"{run}/epoch0001-step0000010").endswith("step0000010")
    assert remove_unregistered(filesystem, run, [registered, final]) == ["epoch0001-step0000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0000-step0000040", "epoch0001-step0000000"]


def test_every_deepspeed_key_generated_from_the_spec_is_refused_in_the_override() -> None:
    # The refusal table in config.py and the generator in strategy.py must not drift apart.
    tunable = {"zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown"}
    generated = set()
    for key, value in deepspeed_config(_spec(strategy={"name": "deepspeed"}, precision={"dtype": "bf16"}), 2).items():
        if key not in tunable:
            generated |= {(key, inner) for inner in value} if isinstance(value, dict) else {(key,)}
    assert generated <= set(DEEPSPEED_KEYS_FROM_THE_SPEC), generated - set(DEEPSPEED_KEYS_FROM_THE_SPEC)


def _ddp_step_warnings(rank: int, port: int, results: dict) -> None:
    import os
    import warnings

    import torch.distributed as dist

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for channels_last, resolution, batch_size in [(True, 32, 4), (True, 64, 16), (False, 32, 4)]:
        model = effnet.build("efficientnet_b0", num_classes=10)
        strategy = DDP(model, _spec(precision={"channels_last": channels_last}), torch.device("cpu"))
        images = torch.randn(batch_size, 3, resolution, resolution)
        batch = _batch(images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
                       torch.randint(0, 10, (batch_size,)), torch.ones(batch_size))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                strategy.micro_step(batch, lambda logits, batch: weighted_loss(logits, batch, 0.0), sync=True)
                strategy.optimizer_step(lr=1e-3)
        results[(rank, channels_last, resolution)] = [str(w.message) for w in caught if "strides" in str(w.message)]
    dist.destroy_process_group()


def test_ddp_gets_gradients_laid_out_like_its_buckets() -> None:
    # Squeeze-excite runs its 1x1 convs as matrix products: with `flatten`, their gradients came back with the
    # default strides, and every channels_last DDP job warned and copied them into DDP's buckets.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_step_warnings, args=(port, results), nprocs=2)
    assert len(results) == 6 and not any(results.values()), dict(results)
