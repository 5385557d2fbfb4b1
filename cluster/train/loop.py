"""`train_loop_per_worker`: what every Ray Train worker runs.

One epoch on one rank:

    for each batch of the rank's ShardLoader (equal steps on every rank, resumable mid-epoch):
        micro-step: forward, loss weighted by the batch weights (padding and bad images count 0), backward
        every `grad_accumulation` micro-steps (and at the end of the epoch): optimiser step at lr(step), EMA
        every `checkpoint.every_steps`: checkpoint
    all-reduce what every rank trained on → `train_samples_epoch`
    evaluate the model (and its EMA) on the validation split
    report the epoch's metrics with a checkpoint

Every rank calls `ray.train.report` at the same steps (it is a barrier). A restarted worker group
starts from `ray.train.get_checkpoint()`: model, optimiser, EMA, scaler, RNG, and the loader at the
exact batch, so the interrupted epoch trains on every sample once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.data.loader import Batch, ShardLoader
from cluster.data.manifest import ManifestError, ShardManifest, load_manifest
from cluster.storage import S3Access
from cluster.train.checkpoint import (
    EMA_FILE,
    WEIGHTS_FILE,
    Progress,
    load_progress,
    new_checkpoint_dir,
    save_progress,
    upload_with_retries,
)
from cluster.train.config import TrainingSpec
from cluster.train.models import build_model, count_parameters
from cluster.train.schedule import LrSchedule
from cluster.train.strategy import Strategy, WeightEMA, make_strategy

log = logging.getLogger(__name__)

TOP_K = (1, 5)
PROGRESS_LINES_PER_EPOCH = 5


@dataclass(frozen=True)
class WorkerJob:
    """What the driver hands every worker: the resolved spec, S3 access, and the full job spec as JSON."""

    spec: TrainingSpec
    s3: S3Access
    spec_json: str  # saved inside every checkpoint
    threads_per_worker: int
    dataset_ids: dict[str, str]  # "data.train"/"data.val" → manifest sha256 the driver resolved


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    job: WorkerJob = config["job"]
    spec = job.spec
    _log_to_stderr()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.threads_per_worker)
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.optim.seed * 1000 + rank)  # dropout and stochastic depth differ per rank

    train_loader, val_loader = _loaders(job, rank, world_size)
    model = build_model(spec.model)
    if rank == 0:
        total, trainable = count_parameters(model)
        log.info("%s: %s, %d classes at %d px, %s parameters (%s trainable), %s on %d workers",
                 spec.name, spec.model.arch, spec.model.num_classes, spec.model.resolution, f"{total:,}",
                 f"{trainable:,}", spec.strategy.name, world_size)
    strategy = make_strategy(model.to(device), spec, device)
    ema = WeightEMA(strategy.module, spec.optim.ema_decay) if spec.optim.ema_decay else None
    schedule = _schedule(spec, train_loader)

    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = _restore(Path(directory), strategy, ema, rank)
        if rank == 0:
            log.info("resumed from checkpoint %s: epoch %d, step %d", checkpoint.path, progress.epoch, progress.step)

    trainer = _EpochTrainer(job, strategy, ema, schedule, rank, world_size, device)
    for epoch in range(progress.epoch, spec.optim.epochs):
        trainer.train_epoch(train_loader, progress)
        metrics = trainer.finish_epoch(val_loader, progress)
        progress.history.append(metrics)
        last = epoch + 1 == spec.optim.epochs
        progress = progress.next_epoch()
        trainer.report(metrics, progress, with_checkpoint=spec.checkpoint.at_epoch_end or last)


def _log_to_stderr() -> None:
    """Our INFO lines reach the driver: Ray forwards a worker's stderr, but its root logger drops INFO."""
    package = logging.getLogger("cluster")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report and upload


def _loaders(job: WorkerJob, rank: int, world_size: int) -> tuple[ShardLoader, ShardLoader]:
    spec = job.spec
    assert spec.data.val is not None and spec.model.resolution is not None
    common = {"batch_size": spec.data.batch_size, "resolution": spec.model.resolution, "s3": job.s3, "rank": rank,
              "world_size": world_size, "loader_workers": spec.data.loader_workers, "seed": spec.optim.seed}
    train_manifest = _expected_manifest(job, "data.train", spec.data.train.manifest)
    val_manifest = _expected_manifest(job, "data.val", spec.data.val.manifest)
    train = ShardLoader(train_manifest, spec.data.train.split, shuffle=True, augment=spec.data.augment,
                        shuffle_buffer=spec.data.shuffle_buffer, **common)
    val = ShardLoader(val_manifest, spec.data.val.split, shuffle=False, augment=None, **common)
    return train, val


def _expected_manifest(job: WorkerJob, field: str, url: str) -> ShardManifest:
    """The manifest at `url`, if it is still the dataset the job was launched on."""
    manifest, dataset_id = load_manifest(url, s3=job.s3)
    if dataset_id != job.dataset_ids[field]:
        raise ManifestError(f"{field}: the dataset at {url} was written again after the job started "
                            f"(id {dataset_id[:12]}…, not {job.dataset_ids[field][:12]}…); resuming would mix two datasets")
    return manifest


def _schedule(spec: TrainingSpec, loader: ShardLoader) -> LrSchedule:
    """Warm-up then cosine over every optimiser step of the run (epochs may differ by a step or two)."""
    accumulation = spec.optim.grad_accumulation
    per_epoch = [math.ceil(loader.steps_in_epoch(epoch) / accumulation) for epoch in range(spec.optim.epochs)]
    warmup = spec.optim.warmup_steps
    if warmup is None:
        warmup = round(spec.optim.warmup_epochs * per_epoch[0])
    return LrSchedule(peak=spec.peak_lr, warmup_steps=warmup, total_steps=sum(per_epoch),
                      final_fraction=spec.optim.final_lr_fraction)


def _restore(directory: Path, strategy: Strategy, ema: WeightEMA | None, rank: int) -> Progress:
    strategy.load(directory)
    if ema is not None:
        ema.load_state_dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True))
    return load_progress(directory, rank=rank)


def weighted_loss(logits: torch.Tensor, batch: Batch, label_smoothing: float) -> torch.Tensor:
    """Mean over the nominal batch of each sample's loss × its weight (0 for padding and bad images).

    The denominator is the batch size, not the real samples, so a rank's last, padded batch
    counts for what it holds and ranks stay comparable under DDP's gradient averaging.
    """
    per_sample = F.cross_entropy(logits, batch.labels, reduction="none", label_smoothing=label_smoothing)
    return (per_sample * batch.weights).sum() / batch.weights.numel()


class _EpochTrainer:
    """The steps of one epoch, the end-of-epoch evaluation, and reports."""

    def __init__(self, job: WorkerJob, strategy: Strategy, ema: WeightEMA | None, schedule: LrSchedule,
                 rank: int, world_size: int, device: torch.device) -> None:
        self.job, self.spec = job, job.spec
        self.strategy, self.ema, self.schedule = strategy, ema, schedule
        self.rank, self.world_size, self.device = rank, world_size, device
        self.memory_format = torch.channels_last if self.spec.precision.channels_last else torch.contiguous_format
        self.sample_log = _open_sample_log(self.spec.data.sample_log, rank)
        self.train_seconds = 0.0

    def _loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return weighted_loss(logits, batch, self.spec.optim.label_smoothing)

    def train_epoch(self, loader: ShardLoader, progress: Progress) -> None:
        spec = self.spec
        loader.load_state_dict({"epoch": progress.epoch, "step": progress.step})
        steps = loader.steps_per_epoch
        every = spec.checkpoint.every_steps
        log_every = max(1, steps // PROGRESS_LINES_PER_EPOCH)
        self.strategy.module.train()
        started = time.perf_counter()
        self.train_seconds = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on device: no sync per step
        step_started = started
        for batch in loader:
            step = progress.step + 1
            sync = step % spec.optim.grad_accumulation == 0 or step == steps
            loss = self.strategy.micro_step(batch.to(self.device, memory_format=self.memory_format), self._loss,
                                            sync=sync)
            if sync:
                lr = self.schedule(progress.optimizer_steps)
                self.strategy.optimizer_step(lr)
                progress.optimizer_steps += 1
                if self.ema is not None:
                    self.ema.update(self.strategy.module)
            progress.step = step
            real = batch.real_samples
            progress.tally.samples += real
            progress.tally.bad_samples += len(batch.bad_keys)
            loss_sum += loss * batch.weights.numel()  # back to a sum over the real samples
            if self.sample_log is not None:
                self.sample_log.write(json.dumps({"epoch": progress.epoch, "step": step, "rank": self.rank,
                                                  "pid": os.getpid(), "keys": batch.real_keys()}) + "\n")
                self.sample_log.flush()
            if self.rank == 0 and (step % log_every == 0 or step == steps):
                log.info("epoch %d step %d/%d  loss %.4f  lr %.2e  %.1f img/s", progress.epoch, step, steps,
                         loss.item() * batch.weights.numel() / max(real, 1), self.schedule(progress.optimizer_steps),
                         real * self.world_size / (time.perf_counter() - step_started))
            if every is not None and step % every == 0 and step < steps:
                progress.tally.loss_sum += loss_sum.item()
                loss_sum.zero_()
                self.train_seconds += time.perf_counter() - started
                self.report({"epoch": progress.epoch, "step": step}, progress, with_checkpoint=True)
                started = time.perf_counter()
            step_started = time.perf_counter()
        progress.tally.loss_sum += loss_sum.item()
        self.train_seconds += time.perf_counter() - started

    def finish_epoch(self, val_loader: ShardLoader, progress: Progress) -> dict[str, float]:
        """All-reduce the epoch's tallies and evaluate; the metrics rank 0 reports."""
        tally = progress.tally
        totals = _all_reduce([tally.samples, tally.loss_sum, tally.bad_samples, self.train_seconds], self.device)
        samples, loss_sum, bad, seconds = totals
        metrics = {
            "epoch": progress.epoch, "step": progress.step, "optimizer_steps": progress.optimizer_steps,
            "train_samples_epoch": int(samples), "train_bad_samples_epoch": int(bad),
            "train_loss": loss_sum / max(samples, 1),
            "lr": self.schedule(max(0, progress.optimizer_steps - 1)),
            "train_images_per_s": samples / max(seconds / self.world_size, 1e-9),
        }
        metrics |= {f"val_{k}": v for k, v in self._evaluate(self.strategy.module, val_loader).items()}
        if self.ema is not None:
            metrics |= {f"ema_val_{k}": v for k, v in self._evaluate(self.ema.module, val_loader).items()}
        if self.rank == 0:
            log.info("epoch %d done: %s", progress.epoch,
                     "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "step")))
        return metrics

    @torch.no_grad()
    def _evaluate(self, model: torch.nn.Module, loader: ShardLoader) -> dict[str, float]:
        """Loss and top-k accuracy over the rank's share of the split, summed over every rank."""
        was_training = model.training
        model.eval()
        dtype = next(model.parameters()).dtype  # DeepSpeed may run the model in bf16/fp16
        # [loss sum, samples, top-1 hits, top-5 hits], kept on the device: no sync per batch
        sums = torch.zeros(2 + len(TOP_K), dtype=torch.float64, device=self.device)
        loader.load_state_dict({"epoch": 0, "step": 0})
        for batch in loader:
            batch = batch.to(self.device, memory_format=self.memory_format)
            with self.strategy.autocast():
                logits = model(batch.images.to(dtype)).float()
            weights = batch.weights
            hits = logits.topk(min(max(TOP_K), logits.shape[1]), dim=1).indices == batch.labels[:, None]
            sums += torch.stack([
                (F.cross_entropy(logits, batch.labels, reduction="none") * weights).sum(), weights.sum(),
                *((hits[:, :k].any(dim=1).float() * weights).sum() for k in TOP_K),
            ]).double()
        model.train(was_training)
        loss_sum, count, *correct = _all_reduce(sums.tolist(), self.device)
        count = max(count, 1.0)
        return {"loss": loss_sum / count, **{f"top{k}": c / count for k, c in zip(TOP_K, correct, strict=True)}}

    def report(self, metrics: dict, progress: Progress, *, with_checkpoint: bool) -> None:
        """`ray.train.report` on every rank (a barrier), with this rank's part of a checkpoint of `progress`
        (the start of an epoch after an epoch's end)."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if not with_checkpoint:
            ray.train.report(metrics)
            return
        directory = new_checkpoint_dir()
        self.strategy.save(directory, rank=self.rank)
        save_progress(directory, progress, rank=self.rank, spec_json=self.job.spec_json)
        if self.ema is not None and self.rank == 0:
            torch.save(self.ema.state_dict(), directory / EMA_FILE)
        if progress.step == 0:  # an epoch's end: the weights alone too
            self._save_weights(directory)
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(str(directory)), checkpoint_dir_name=progress.name,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=upload_with_retries(self.job.s3.retry_window_s),
        )

    def _save_weights(self, directory: Path) -> None:
        """The weights alone, as a file any later stage can load (every rank joins a ZeRO-3 gather)."""
        state = self.strategy.full_state_dict()
        if self.rank != 0:
            return
        weights = {k: v.detach().float().contiguous() for k, v in state.items()}
        module = self.strategy.module
        if self.spec.model.is_efficientnet:
            from effnet.weights import save_checkpoint

            save_checkpoint(module, directory / WEIGHTS_FILE, state=weights)
        else:
            import safetensors.torch

            safetensors.torch.save_file(weights, directory / WEIGHTS_FILE, metadata={"arch": self.spec.model.arch})


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _open_sample_log(directory: str | None, rank: int) -> IO[str] | None:
    if directory is None:
        return None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return (path / f"rank-{rank}.jsonl").open("a")

