"""`train_loop_per_worker`: what every Ray Train worker runs.

One epoch on one rank:

    for each batch of the rank's ShardLoader (equal steps on every rank, resumable mid-epoch):
        micro-step: forward, loss weighted by the batch weights (padding and bad images count 0), backward
        every `grad_accumulation` micro-steps (and at the end of the epoch): optimiser step at lr(step), EMA
        every `checkpoint.every_steps`, and when Ray says a node of the group goes: checkpoint
    all-reduce what every rank trained on → `train_samples_epoch`
    evaluate the model (and its EMA) on the validation split
    report the epoch's metrics with a checkpoint
    rank 0: the metrics, a training-curve plot and a confusion matrix to the job's MLflow run

A distillation job (`spec.distill`) adds a frozen teacher beside the model (`cluster.train.distill`):
the training split is cropped at the larger of the two resolutions, the teacher scores the crop, and
the loss is the distillation loss; the rest of the loop is the same.

Every rank calls `ray.train.report` at the same steps (it is a barrier). A restarted worker group
starts from its latest checkpoint (`checkpoint.resume_point`): model, optimiser, EMA, scaler, RNG,
and the loader at the exact batch, so the interrupted epoch trains on every sample once. Rank 0's MLflow outbox (what the
server has not acknowledged yet) is saved with every checkpoint and queued again on restart.

An elastic job (`scaling.num_workers: {min, max}`) may restart on another number of workers: the loader
re-plans the rest of the epoch over them, and each optimiser step accumulates as many micro-batches as keep
the global batch (`TrainingSpec.accumulation_at`); the LR schedule counts steps on the most workers, so it
goes on where it was.

Every checkpoint carries the job's goodput ledger (`cluster.train.goodput`), and rank 0 logs it with the
world size: MLflow shows `goodput`, `world_size`, `preemptions`, and per restart `restarts` and `restart_lost_s`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.data.loader import Batch, ShardLoader
from cluster.data.manifest import ManifestError, ShardManifest, load_manifest
from cluster.plots import confusion_matrix, training_curves
from cluster.storage import S3Access, split_s3_url
from cluster.tracking import RunLogger, RunRef, TrackingSpec
from cluster.train.bn_statistics import recalibrate_batchnorm
from cluster.train.checkpoint import (
    EMA_FILE,
    TRACKING_FILE,
    WEIGHTS_FILE,
    EpochTally,
    Progress,
    load_progress,
    new_checkpoint_dir,
    resume_point,
    save_progress,
    upload_with_retries,
)
from cluster.train.config import TrainingSpec
from cluster.train.distill import (
    TEACHER_FILE,
    Distiller,
    StudentWithAdapters,
    load_pinned,
    student_of,
    student_state,
    teacher_url,
)
from cluster.train.goodput import GoodputClock
from cluster.train.models import build_model, count_parameters
from cluster.train.preemption import Action, PreemptionGuard
from cluster.train.schedule import LrSchedule
from cluster.train.strategy import DTYPES, Strategy, WeightEMA, make_strategy

log = logging.getLogger(__name__)

TOP_K = (1, 5)
PROGRESS_LINES_PER_EPOCH = 5
FINAL_FLUSH_S = 300.0  # how long the last MLflow entries may wait for an unreachable server
EPOCH_METRIC = "train_samples_epoch"  # logged once per epoch: tells which epochs the MLflow run has


@dataclass(frozen=True)
class WorkerJob:
    """What the driver hands every worker: the resolved spec, S3 access, and the full job spec as JSON."""

    spec: TrainingSpec
    s3: S3Access
    spec_json: str  # saved inside every checkpoint
    threads_per_worker: int
    dataset_ids: dict[str, str]  # "data.train"/"data.val" → manifest sha256 the driver resolved
    run: RunRef | None = None  # the job's MLflow run; None: not tracked
    tracking: TrackingSpec = field(default_factory=TrackingSpec)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    started_at = time.time()
    job: WorkerJob = config["job"]
    spec = job.spec
    _log_to_stderr()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.threads_per_worker)
    job.s3.check_credentials()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.optim.seed * 1000 + rank)  # dropout and stochastic depth differ per rank

    model = build_model(spec.model)
    if rank == 0:
        total, trainable = count_parameters(model)
        log.info("%s: %s, %d classes at %d px, %s parameters (%s trainable), %s on %d workers",
                 spec.name, spec.model.arch, spec.model.num_classes, spec.model.resolution, f"{total:,}",
                 f"{trainable:,}", spec.strategy.name, world_size)
    distiller = _distiller(job, device, rank) if spec.distill is not None else None
    if distiller is not None and distiller.spec.features is not None:
        model = StudentWithAdapters(model, distiller.teacher_channels())
    assert spec.model.resolution is not None
    train_loader, val_loader, calibration_loader = _loaders(
        job, rank, world_size, crop_resolution=distiller.crop_resolution if distiller else spec.model.resolution)
    strategy = make_strategy(model.to(device), spec, device)
    ema = WeightEMA(strategy.module, spec.optim.ema_decay) if spec.optim.ema_decay else None
    schedule = _schedule(spec, train_loader)

    progress, pending = Progress(), None
    checkpoint = resume_point(ray.train.get_checkpoint(), rank=rank, device=device)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = _restore(Path(directory), strategy, ema, rank, world_size)
            pending = _unsent(Path(directory)) if rank == 0 else None
        if rank == 0:
            log.info("resumed from checkpoint %s: epoch %d, step %d", checkpoint.path, progress.epoch, progress.step)
    before, progress.world_size = progress.world_size, world_size
    global_batch = spec.data.batch_size * world_size * strategy.accumulation
    if rank == 0 and checkpoint is not None and before != world_size:
        log.info("%d workers now, %d before: the rest of epoch %d is re-planned over them; each optimiser step "
                 "accumulates %d micro-batches of %d per worker: a global batch of %d (the spec's %d)", world_size,
                 before, progress.epoch, strategy.accumulation, spec.data.batch_size, global_batch, spec.global_batch)

    logger = None
    if rank == 0 and job.run is not None:
        logger = RunLogger(job.run, pending=pending, system_metrics=job.tracking.system_metrics)
        log.info("MLflow run: %s", job.run.url)
    clock = GoodputClock(progress.goodput, started_at=started_at, world_size=world_size, world_before=before,
                         resumed=checkpoint is not None)
    trainer = _EpochTrainer(job, strategy, ema, schedule, clock, rank, world_size, device, logger, distiller,
                            calibration_loader)
    if logger is not None:  # an epoch logged before the restart is redone, not logged again
        trainer.epochs_logged = logger.last_step(EPOCH_METRIC)
        logger.log_metrics({"world_size": world_size, "global_batch": global_batch}, step=progress.optimizer_steps)
    try:
        for epoch in range(progress.epoch, spec.optim.epochs):
            trainer.train_epoch(train_loader, progress, val_steps=val_loader.steps_per_epoch)
            if epoch + 1 < spec.optim.epochs:
                train_loader.prefetch()  # the next epoch's first shards are read during the evaluation
            metrics = trainer.finish_epoch(val_loader, progress)
            progress.history.append(metrics)
            trainer.log_epoch(progress.history, train_loader.classes)
            last = epoch + 1 == spec.optim.epochs
            progress = progress.next_epoch()
            # After a notice an epoch's checkpoint uploads before training goes on too: it may be the last.
            if seconds := trainer.report(metrics, progress, with_checkpoint=spec.checkpoint.at_epoch_end or last,
                                         upload_now=trainer.guard.notice is not None):
                trainer.guard.checkpointed(seconds)
    except BaseException:
        if logger is not None:  # no waiting for MLflow: what is unsent is in the checkpoint the restart resumes
            logger.close(timeout_s=0)
        raise
    if logger is not None:
        logger.close(timeout_s=FINAL_FLUSH_S)


def _log_to_stderr() -> None:
    """Our INFO lines reach the driver: Ray forwards a worker's stderr, but its root logger drops INFO."""
    package = logging.getLogger("cluster")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
    from ray.train.v2._internal.execution import context as ray_train_context

    # Not a line per report and upload; Ray names one of these loggers by its file's path.
    for noisy in ("ray.train", ray_train_context.__file__):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # not "Found credentials" per process


def _loaders(job: WorkerJob, rank: int, world_size: int, *,
             crop_resolution: int) -> tuple[ShardLoader, ShardLoader, ShardLoader | None]:
    """The training split cropped at `crop_resolution` (a distilling teacher's may be larger than the
    student's), the validation split at the model's resolution, and (unless switched off) the training
    split as the model sees it, shuffled as training is, for recomputing BatchNorm statistics: read in
    this process (a few batches an epoch)."""
    spec = job.spec
    assert spec.data.val is not None and spec.model.resolution is not None
    common = {"batch_size": spec.data.batch_size, "s3": job.s3, "rank": rank,
              "world_size": world_size, "loader_workers": spec.data.loader_workers, "seed": spec.optim.seed}
    train_manifest = _expected_manifest(job, "data.train", spec.data.train.manifest)
    val_manifest = _expected_manifest(job, "data.val", spec.data.val.manifest)
    train = ShardLoader(train_manifest, spec.data.train.split, shuffle=True, augment=spec.data.augment,
                        shuffle_buffer=spec.data.shuffle_buffer, resolution=crop_resolution, **common)
    val = ShardLoader(val_manifest, spec.data.val.split, shuffle=False, augment=None,
                      resolution=spec.model.resolution, **common)
    calibration = None
    if spec.model.bn_recalibration_batches:
        calibration = ShardLoader(train_manifest, spec.data.train.split, shuffle=True, augment=spec.data.augment,
                                  shuffle_buffer=spec.data.shuffle_buffer, resolution=spec.model.resolution,
                                  **{**common, "loader_workers": 0})
    return train, val, calibration


def _distiller(job: WorkerJob, device: torch.device, rank: int) -> Distiller:
    """The job's pinned teacher, frozen on this worker's device."""
    spec = job.spec
    assert spec.distill is not None and spec.model.resolution is not None
    url = teacher_url(spec)
    bucket, key = split_s3_url(url)
    with tempfile.TemporaryDirectory(prefix="compound-teacher-") as directory:
        local = Path(directory) / TEACHER_FILE
        job.s3.client().download_file(bucket, key, str(local))
        teacher, info = load_pinned(local, device)
    if spec.precision.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    if rank == 0:
        log.info("distilling from %s (%s at %d px, from %s): alpha %g, temperature %g%s", url, info.arch,
                 info.resolution, info.source, spec.distill.alpha, spec.distill.temperature,
                 f", features of stages {list(spec.distill.features.stages)}" if spec.distill.features else "")
    # bf16 on GPUs whatever the student's precision; on CPU the job's own
    dtype = torch.bfloat16 if device.type == "cuda" else DTYPES[spec.precision.dtype]
    return Distiller(spec.distill, teacher, teacher_resolution=info.resolution,
                     student_resolution=spec.model.resolution,
                     autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))


def _expected_manifest(job: WorkerJob, field: str, url: str) -> ShardManifest:
    """The manifest at `url`, if it is still the dataset the job was launched on."""
    manifest, dataset_id = load_manifest(url, s3=job.s3)
    if dataset_id != job.dataset_ids[field]:
        raise ManifestError(f"{field}: the dataset at {url} was written again after the job started "
                            f"(id {dataset_id[:12]}…, not {job.dataset_ids[field][:12]}…); resuming would mix two datasets")
    return manifest


def _schedule(spec: TrainingSpec, loader: ShardLoader) -> LrSchedule:
    """Warm-up then cosine over every optimiser step of the run on its most workers (epochs may differ by a
    step or two; an elastic job on fewer keeps its global batch, so its steps, and the schedule goes on)."""
    accumulation = spec.optim.grad_accumulation
    per_epoch = [math.ceil(loader.steps_in_epoch(epoch, world_size=spec.scaling.max_workers) / accumulation)
                 for epoch in range(spec.optim.epochs)]
    warmup = spec.optim.warmup_steps
    if warmup is None:
        warmup = round(spec.optim.warmup_epochs * per_epoch[0])
    return LrSchedule(peak=spec.peak_lr, warmup_steps=warmup, total_steps=sum(per_epoch),
                      final_fraction=spec.optim.final_lr_fraction)


def _unsent(directory: Path) -> list[dict] | None:
    """What rank 0 had not yet sent to MLflow when the checkpoint was taken."""
    path = directory / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _restore(directory: Path, strategy: Strategy, ema: WeightEMA | None, rank: int, world_size: int) -> Progress:
    strategy.load(directory)
    if ema is not None:
        ema.load_state_dict(torch.load(directory / EMA_FILE, map_location="cpu", weights_only=True))
    return load_progress(directory, rank=rank, world_size=world_size)


def _fold(sums: torch.Tensor, tally: EpochTally) -> None:
    """Move the steps' on-device sums into the rank's tally (a checkpoint saves the tally)."""
    loss_sum, teacher_hits = sums.tolist()
    tally.loss_sum += loss_sum
    tally.teacher_hits += round(teacher_hits)
    sums.zero_()


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
                 clock: GoodputClock, rank: int, world_size: int, device: torch.device, logger: RunLogger | None,
                 distiller: Distiller | None = None, calibration: ShardLoader | None = None) -> None:
        self.job, self.spec, self.logger, self.distiller = job, job.spec, logger, distiller
        self.calibration = calibration
        self.strategy, self.ema, self.schedule, self.clock = strategy, ema, schedule, clock
        self.rank, self.world_size, self.device = rank, world_size, device
        self.memory_format = torch.channels_last if self.spec.precision.channels_last else torch.contiguous_format
        self.sample_log = _open_sample_log(self.spec.data.sample_log, rank)
        self.train_seconds = 0.0
        self.confusion: torch.Tensor | None = None  # of the last evaluation: [true class, predicted class]
        self.epochs_logged = 0  # epochs already in the MLflow run
        self.guard = PreemptionGuard(rank, device)
        self.epoch_end_s: float | None = None  # the last epoch's evaluation, recalibration included

    def _loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return weighted_loss(logits, batch, self.spec.optim.label_smoothing)

    def train_epoch(self, loader: ShardLoader, progress: Progress, val_steps: int) -> None:
        spec = self.spec
        loader.load_state_dict({**(progress.loader or {}), "epoch": progress.epoch, "step": progress.step})
        steps, start = loader.steps_per_epoch, loader.phase_start
        # Micro-steps count from the start of the loader's phase (a change of world size), where an optimiser
        # step ended; on fewer workers than its most, an elastic job accumulates more of them per step.
        accumulation = self.strategy.accumulation
        every = spec.checkpoint.every_steps
        if every is not None:
            every = every // spec.optim.grad_accumulation * accumulation
        log_every = max(1, steps // PROGRESS_LINES_PER_EPOCH)
        metrics_every = self.job.tracking.metrics_every_steps
        self.strategy.module.train()
        started = time.perf_counter()
        self.train_seconds = 0.0
        # [loss sum, teacher hits] on the device: no sync per step; `_fold` moves them into the tally
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        step_started = window_started = started
        window_samples = 0
        for batch in loader:
            step = progress.step + 1
            sync = (step - start) % accumulation == 0 or step == steps
            batch, loss_fn = batch.to(self.device, memory_format=self.memory_format), self._loss
            if self.distiller is not None:
                batch, loss_fn, teacher_hits = self.distiller.prepare(batch, self.strategy.module, self._loss)
                sums[1] += teacher_hits
            loss = self.strategy.micro_step(batch, loss_fn, sync=sync)
            if sync:
                lr = self.schedule(progress.optimizer_steps)
                self.strategy.optimizer_step(lr)
                progress.optimizer_steps += 1
                if self.ema is not None:
                    self.ema.update(self.strategy.module)
            progress.step = step
            if not self.clock.stepping:
                self._first_step_done(progress, time.perf_counter() - step_started)
            real = batch.real_samples
            progress.tally.samples += real
            progress.tally.bad_samples += len(batch.bad_keys)
            sums[0] += loss * batch.weights.numel()  # back to a sum over the real samples
            window_samples += real
            if self.logger is not None and (step % metrics_every == 0 or step == steps):
                now = time.perf_counter()
                self.logger.log_metrics({
                    "step_train_loss": loss.item() * batch.weights.numel() / max(real, 1),
                    "step_lr": self.schedule(progress.optimizer_steps),
                    "step_images_per_s": window_samples * self.world_size / max(now - window_started, 1e-9),
                }, step=progress.optimizer_steps)
                window_started, window_samples = now, 0
            if self.sample_log is not None:
                self.sample_log.write(json.dumps({"epoch": progress.epoch, "step": step, "rank": self.rank,
                                                  "pid": os.getpid(), "time": time.time(),
                                                  "keys": batch.real_keys()}) + "\n")
                self.sample_log.flush()
            if self.rank == 0 and (step % log_every == 0 or step == steps):
                log.info("epoch %d step %d/%d  loss %.4f  lr %.2e  %.1f img/s", progress.epoch, step, steps,
                         loss.item() * batch.weights.numel() / max(real, 1), self.schedule(progress.optimizer_steps),
                         real * self.world_size / (time.perf_counter() - step_started))
            # A drain's deadline may fall in the epoch's evaluation: the step before it asks with its time.
            then_s = self._epoch_end_s(val_steps) if step + accumulation >= steps else 0.0
            action = self.guard.at_optimizer_step(then_s) if sync and step < steps else Action.TRAIN
            due = every is not None and (step - start) % every == 0 and step < steps
            if action is not Action.TRAIN or due:
                if action is Action.CHECKPOINT:
                    self.clock.ledger.preempted(self.guard.notice.preempted_node_ids)
                _fold(sums, progress.tally)
                self.train_seconds += time.perf_counter() - started
                progress.loader = loader.state_dict()
                # Once a node is going, every checkpoint uploads before training goes on: any may be the last,
                # and the guard times the whole of it.
                seconds = self.report({"epoch": progress.epoch, "step": step}, progress, with_checkpoint=True,
                                      upload_now=self.guard.notice is not None)
                self.guard.checkpointed(seconds)
                if action is Action.CHECKPOINT_AND_HOLD:
                    held = time.perf_counter()
                    self.guard.hold()
                    self.clock.overhead(time.perf_counter() - held)
                started = time.perf_counter()
            step_started = time.perf_counter()
        _fold(sums, progress.tally)
        self.train_seconds += time.perf_counter() - started

    def _first_step_done(self, progress: Progress, step_s: float) -> None:
        lost = self.clock.first_step_done(step_s)
        if lost is None or self.rank != 0:
            return
        ledger = self.clock.ledger
        log.info("restart %d: %.1f s lost, from the checkpoint it resumed from to its first step", ledger.restarts,
                 lost)
        if self.logger is not None:
            self.logger.log_metrics({"restarts": ledger.restarts, "restart_lost_s": lost},
                                    step=progress.optimizer_steps)

    def _epoch_end_s(self, val_steps: int) -> float:
        """The epoch's evaluation: as long as the last one, or, before any, a training micro-step's time for
        each validation batch and model (forward alone is faster: the guess errs early)."""
        if self.epoch_end_s is not None:
            return self.epoch_end_s
        return self.guard.step_s / self.strategy.accumulation * val_steps * (2 if self.ema is not None else 1)

    def finish_epoch(self, val_loader: ShardLoader, progress: Progress) -> dict[str, float]:
        """All-reduce the epoch's tallies and evaluate; the metrics rank 0 reports."""
        began = time.perf_counter()
        tally = progress.tally
        totals = _all_reduce([tally.samples, tally.loss_sum, tally.bad_samples, tally.teacher_hits, self.train_seconds],
                             self.device)
        samples, loss_sum, bad, teacher_hits, seconds = totals
        metrics = {
            "epoch": progress.epoch, "step": progress.step, "optimizer_steps": progress.optimizer_steps,
            "train_samples_epoch": int(samples), "train_bad_samples_epoch": int(bad),
            "train_loss": loss_sum / max(samples, 1),
            "lr": self.schedule(max(0, progress.optimizer_steps - 1)),
            "train_images_per_s": samples / max(seconds / self.world_size, 1e-9),
        }
        if self.distiller is not None:  # the teacher on the student's crops: a wrong teacher shows here first
            metrics["train_teacher_top1"] = teacher_hits / max(samples, 1)
        self._recalibrate(self.strategy.module, progress.epoch)
        evaluation, self.confusion = self._evaluate(self.strategy.module, val_loader)
        metrics |= {f"val_{k}": v for k, v in evaluation.items()}
        if self.ema is not None:
            self._recalibrate(self.ema.module, progress.epoch)
            metrics |= {f"ema_val_{k}": v for k, v in self._evaluate(self.ema.module, val_loader)[0].items()}
        if self.rank == 0:
            log.info("epoch %d done: %s", progress.epoch,
                     "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "step")))
        self.epoch_end_s = time.perf_counter() - began
        return metrics

    def log_epoch(self, history: list[dict], classes: list[str]) -> None:
        """Rank 0: the epoch's metrics (step = epochs done), the training curves and the confusion matrix."""
        if self.logger is None:
            return
        metrics = history[-1]
        done = metrics["epoch"] + 1
        if done <= self.epochs_logged:
            return
        # Not the counters (epoch, steps) nor the LR again: the charts show those as steps and step_lr.
        shown = {k: v for k, v in metrics.items() if k not in ("epoch", "step", "optimizer_steps", "lr")}
        self.logger.log_metrics(shown, step=done)
        title = f"{self.spec.name}: {self.spec.model.arch}"
        self.logger.log_artifact("plots/training_curves.png", training_curves(history, title=title))
        assert self.confusion is not None
        matrix = confusion_matrix(self.confusion, classes, title=f"validation after epoch {done}")
        self.logger.log_artifact(f"plots/confusion_matrix/epoch_{done:03d}.png", matrix)

    def _recalibrate(self, model: torch.nn.Module, epoch: int) -> None:
        """BatchNorm statistics for the weights as they are, from the first batches of this epoch's training
        split (the same on a rerun of the epoch, so a resumed job saves the same statistics)."""
        if self.calibration is None:
            return
        self.calibration.load_state_dict({"epoch": epoch, "step": 0})
        dtype = next(model.parameters()).dtype
        inputs = (batch.to(self.device, memory_format=self.memory_format).images.to(dtype)
                  for batch in itertools.islice(self.calibration, self.spec.model.bn_recalibration_batches))
        with self.strategy.autocast():
            batches = recalibrate_batchnorm(model, inputs)
        if self.rank == 0:
            log.info("BatchNorm statistics recomputed over %d training batches of %d on each of %d workers",
                     batches, self.spec.data.batch_size, self.world_size)

    @torch.no_grad()
    def _evaluate(self, model: torch.nn.Module, loader: ShardLoader) -> tuple[dict[str, float], torch.Tensor]:
        """Loss and top-k accuracy over the rank's share of the split, summed over every rank (a distilled
        model also its agreement with the teacher's top-1); and the confusion counts [true, predicted] over
        the whole split."""
        was_training = model.training
        model.eval()
        dtype = next(model.parameters()).dtype  # DeepSpeed may run the model in bf16/fp16
        # [loss sum, samples, top-1 hits, top-5 hits, agreements with the teacher], kept on the device: no sync
        # per batch
        sums = torch.zeros(3 + len(TOP_K), dtype=torch.float64, device=self.device)
        classes = loader.num_classes
        confusion = torch.zeros(classes * classes, dtype=torch.float64, device=self.device)
        loader.load_state_dict({"epoch": 0, "step": 0})
        for batch in loader:
            batch = batch.to(self.device, memory_format=self.memory_format)
            with self.strategy.autocast():
                logits = model(batch.images.to(dtype)).float()
            weights = batch.weights
            hits = logits.topk(min(max(TOP_K), logits.shape[1]), dim=1).indices == batch.labels[:, None]
            agree = (self.distiller.teacher_classes(batch.images) == logits.argmax(dim=1) if self.distiller
                     else torch.zeros_like(weights))
            sums += torch.stack([
                (F.cross_entropy(logits, batch.labels, reduction="none") * weights).sum(), weights.sum(),
                *((hits[:, :k].any(dim=1).float() * weights).sum() for k in TOP_K), (agree.float() * weights).sum(),
            ]).double()
            confusion += torch.bincount(batch.labels * classes + logits.argmax(dim=1), weights=weights.double(),
                                        minlength=classes * classes)
        model.train(was_training)
        totals = torch.cat([sums, confusion])  # one collective for both
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, count, *correct, agreements = totals[:len(sums)].tolist()
        confusion = totals[len(sums):]
        count = max(count, 1.0)
        metrics = {"loss": loss_sum / count, **{f"top{k}": c / count for k, c in zip(TOP_K, correct, strict=True)}}
        if self.distiller is not None:
            metrics["teacher_agreement"] = agreements / count
        return metrics, confusion.view(classes, classes).cpu()

    def report(self, metrics: dict, progress: Progress, *, with_checkpoint: bool, upload_now: bool = False) -> float:
        """`ray.train.report` on every rank (a barrier), with this rank's part of a checkpoint of `progress`
        (the start of an epoch after an epoch's end). It uploads beside the next steps, or, `upload_now` (a
        node is about to go), before them: that checkpoint is the one that counts, and on busy CPUs an upload
        beside training takes several times as long (B7's state on 2 cores: 20 s against 5). Returns the
        seconds it took (0 without a checkpoint)."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if not with_checkpoint:
            ray.train.report(metrics)
            return 0.0
        started = time.perf_counter()
        ledger = self.clock.close_books()
        progress.goodput = ledger.state()
        if self.logger is not None:
            self.logger.log_metrics({"goodput": ledger.goodput, "world_size": self.world_size,
                                     "preemptions": ledger.preemptions}, step=progress.optimizer_steps)
        directory = new_checkpoint_dir()
        self.strategy.save(directory, rank=self.rank)
        save_progress(directory, progress, rank=self.rank, spec_json=self.job.spec_json,
                      mlflow_run_id=self.job.run.run_id if self.job.run else None)
        if self.ema is not None and self.rank == 0:
            torch.save(self.ema.state_dict(), directory / EMA_FILE)
        if self.logger is not None:
            (directory / TRACKING_FILE).write_text(json.dumps(self.logger.pending()))
        if progress.step == 0:  # an epoch's end: the weights alone too
            self._save_weights(directory)
        ray.train.report(
            metrics, checkpoint=Checkpoint.from_directory(str(directory)), checkpoint_dir_name=progress.name,
            checkpoint_upload_mode=CheckpointUploadMode.SYNC if upload_now else CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=upload_with_retries(self.job.s3.retry_window_s),
        )
        seconds = time.perf_counter() - started
        self.clock.overhead(seconds)
        return seconds

    def _save_weights(self, directory: Path) -> None:
        """The weights alone, as a file any later stage can load (every rank joins a ZeRO-3 gather)."""
        state = self.strategy.full_state_dict()
        if self.rank != 0:
            return
        state, module = student_state(state, self.strategy.module), student_of(self.strategy.module)
        weights = {k: v.detach().float().contiguous() for k, v in state.items()}
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

