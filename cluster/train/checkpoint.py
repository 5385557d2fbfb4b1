"""Training state ↔ Ray checkpoint directories.

One checkpoint directory, merged by Ray from every rank's files:

    progress.json       rank 0: epoch, step within it, optimiser steps, every finished epoch's metrics, the full spec,
                        the job's MLflow run id
    rank-<r>.pt         every rank: its RNG state and what it trained so far this epoch
    training.pt         DDP, rank 0: model, optimiser and grad-scaler state
    deepspeed/          DeepSpeed: every rank its ZeRO shard (DeepSpeed's own layout)
    ema.pt              rank 0, with an EMA: the averaged weights
    mlflow-outbox.json  rank 0, when tracked: what MLflow had not yet acknowledged (sent again on resume)
    model.safetensors   rank 0, at the end of an epoch: the weights alone, loadable without the job
                        (`effnet.weights.load_checkpoint` for EfficientNets)
    uploaded-<r>-of-<n> every rank, written once all its files are in the store

Checkpoints are uploaded in the background (`CheckpointUploadMode.ASYNC`) through an upload
function that retries through a store outage for the S3 access's retry window. Ray registers a
checkpoint only once every rank's upload has reached its controller, seconds later; a worker that
dies in between would make a restart go back a checkpoint further than needed. So a restart takes
the newest checkpoint every rank marked uploaded when that is newer than Ray's (`latest_checkpoint`,
through `resume_point`); at the end the driver takes that one as the run's last (a restart with
nothing left to train reports nothing more) and removes the other folders Ray never registered
(`remove_unregistered`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from cluster.data.s3 import backoff_s

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
CHECKPOINT_PREFIX = "epoch"  # every checkpoint folder's name starts so (`Progress.name`)
EMA_FILE = "ema.pt"
TRACKING_FILE = "mlflow-outbox.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = "compound.train/1"


@dataclass
class EpochTally:
    """What one rank trained on so far in the current epoch."""

    samples: int = 0  # real samples: padding and undecodable images excluded
    loss_sum: float = 0.0  # sum over those samples of their loss
    bad_samples: int = 0
    teacher_hits: int = 0  # a distillation job's: samples its teacher labels right

    def plus(self, other: EpochTally) -> EpochTally:
        return EpochTally(self.samples + other.samples, self.loss_sum + other.loss_sum,
                          self.bad_samples + other.bad_samples, self.teacher_hits + other.teacher_hits)


@dataclass
class Progress:
    """Where training is: the same on every rank."""

    epoch: int = 0
    step: int = 0  # micro-steps (loader batches) done in `epoch`
    optimizer_steps: int = 0
    tally: EpochTally = field(default_factory=EpochTally)  # this rank's
    history: list[dict] = field(default_factory=list)  # the metrics of every finished epoch
    world_size: int = 1  # of the worker group that reached this point
    loader: dict | None = None  # the training loader's state mid-epoch (its plan after a change of world size)
    goodput: dict | None = None  # the job's `GoodputLedger` as of this point

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "optimizer_steps": self.optimizer_steps,
                "history": self.history, "world_size": self.world_size, "loader": self.loader,
                "goodput": self.goodput}

    def next_epoch(self) -> Progress:
        return Progress(epoch=self.epoch + 1, optimizer_steps=self.optimizer_steps, history=self.history,
                        world_size=self.world_size, goodput=self.goodput)

    @property
    def name(self) -> str:
        """The checkpoint folder's name: the same for the same point, so a re-run overwrites an orphan."""
        return f"{CHECKPOINT_PREFIX}{self.epoch:04d}-step{self.step:07d}"


LOCAL_PREFIX = "compound-checkpoint-"


def new_checkpoint_dir() -> Path:
    """A local folder for one checkpoint, named for this process; Ray deletes it once uploaded. A worker killed
    mid-checkpoint leaves its folder behind (B7 with its optimiser: gigabytes), so first the folders of
    processes that no longer run go."""
    scratch = Path(tempfile.gettempdir())
    for orphan in scratch.glob(f"{LOCAL_PREFIX}*-*"):
        if (pid := orphan.name[len(LOCAL_PREFIX):].split("-")[0]).isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(orphan, ignore_errors=True)  # another worker of this node may be removing it too
    return Path(tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}{os.getpid()}-", dir=scratch))


def save_progress(directory: Path, progress: Progress, *, rank: int, spec_json: str,
                  mlflow_run_id: str | None = None) -> None:
    """Every rank: its RNG and tally; rank 0 also the shared progress and the spec."""
    torch.save({"rng": torch.get_rng_state(), "python_rng": random.getstate(), "tally": asdict(progress.tally)},
               directory / f"rank-{rank}.pt")
    if rank == 0:
        record = {"format": CHECKPOINT_FORMAT, **progress.state(), "spec": json.loads(spec_json),
                  "mlflow_run_id": mlflow_run_id}
        (directory / PROGRESS_FILE).write_text(json.dumps(record, indent=2))


def load_progress(directory: Path, *, rank: int, world_size: int) -> Progress:
    """The progress a checkpoint holds, with this rank's RNG restored and its tally. Resumed on another
    number of ranks, rank r takes the tallies of the old ranks r, r + world_size, … (the epoch's sums stay
    whole) and, if it is new, a fresh RNG."""
    record = json.loads((directory / PROGRESS_FILE).read_text())
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory} is not a compound training checkpoint (format {record.get('format')!r})")
    saved_world = record.get("world_size", world_size)
    progress = Progress(epoch=record["epoch"], step=record["step"], optimizer_steps=record["optimizer_steps"],
                        history=record["history"], world_size=saved_world, loader=record.get("loader"),
                        goodput=record.get("goodput"))
    for old_rank in range(rank, saved_world, world_size):
        if not (path := directory / f"rank-{old_rank}.pt").is_file():
            continue
        state = torch.load(path, weights_only=True)
        if old_rank == rank:
            torch.set_rng_state(state["rng"])
            random.setstate(state["python_rng"])
        progress.tally = progress.tally.plus(EpochTally(**state["tally"]))
    return progress


UPLOAD_MARKER = re.compile(r"uploaded-\d+-of-(\d+)")


def upload_marker(rank: int, world_size: int) -> str:
    return f"uploaded-{rank}-of-{world_size}"


def upload_with_retries(window_s: float):
    """A `checkpoint_upload_fn` for `ray.train.report`: Ray's own upload, retried through an outage,
    then this rank's upload marker."""
    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        context = ray.train.get_context()
        storage = context.get_storage()
        marker = upload_marker(context.get_world_rank(), context.get_world_size())
        started, attempt = time.monotonic(), 0
        while True:
            try:
                persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
                with persisted.filesystem.open_output_stream(f"{persisted.path}/{marker}"):
                    pass
                return persisted
            except OSError as error:  # pyarrow raises OSError for S3 failures
                if time.monotonic() - started >= window_s:
                    raise OSError(f"could not upload checkpoint {checkpoint_dir_name} for {window_s:.0f} s "
                                  f"(the S3 retry window): {error}") from error
                log.warning("uploading checkpoint %s failed (%s); retrying", checkpoint_dir_name, error)
                time.sleep(backoff_s(attempt))
                attempt += 1

    return upload


def checkpoint_folders(filesystem, experiment_path: str) -> list[str]:
    """The names of the checkpoint folders under a run's storage path, oldest first (names sort by point)."""
    from pyarrow.fs import FileSelector, FileType

    entries = filesystem.get_file_info(FileSelector(experiment_path, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == FileType.Directory
                  and e.base_name.startswith(CHECKPOINT_PREFIX))


def newest_uploaded(filesystem, experiment_path: str) -> str | None:
    """The path of the newest checkpoint folder that every rank of the world that wrote it marked uploaded
    (an elastic job's checkpoints come from worlds of different sizes)."""
    from pyarrow.fs import FileSelector

    for name in reversed(checkpoint_folders(filesystem, experiment_path)):
        path = f"{experiment_path}/{name}"
        if _all_uploaded({e.base_name for e in filesystem.get_file_info(FileSelector(path))}):
            return path
    return None


def _all_uploaded(files: set[str]) -> bool:
    sizes = {int(match.group(1)) for f in files if (match := UPLOAD_MARKER.fullmatch(f))}
    return any({upload_marker(rank, size) for rank in range(size)} <= files for size in sizes)


def latest_checkpoint(filesystem, experiment_path: str, latest_registered: str | None) -> str | None:
    """Ray's latest registered checkpoint, or a newer one every rank had uploaded when a failure cut its
    registration short: where a restart resumes, and where a finished run ended (a restart with nothing
    left to train reports nothing more)."""
    uploaded = newest_uploaded(filesystem, experiment_path)
    if uploaded is not None and (latest_registered is None or Path(uploaded).name > Path(latest_registered).name):
        return uploaded
    return latest_registered


def resume_point(registered, *, rank: int, device: torch.device):
    """The checkpoint a (re)started worker group resumes from: Ray's latest registered one, or a newer one
    every rank had finished uploading when a failure cut its registration short. The same on every rank."""
    import ray.train
    import torch.distributed as dist

    storage = ray.train.get_context().get_storage()
    choice: list[str | None] = [None]
    if rank == 0:
        latest = latest_checkpoint(storage.storage_filesystem, storage.experiment_fs_path,
                                   registered.path if registered else None)
        if latest is not None and (registered is None or Path(latest).name != Path(registered.path).name):
            choice = [latest]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0, device=device)
    if choice[0] is None:
        return registered
    if rank == 0:
        log.info("checkpoint %s was uploaded by every rank but not yet registered: resuming from it", choice[0])
    return ray.train.Checkpoint(path=choice[0], filesystem=storage.storage_filesystem)


def remove_unregistered(filesystem, experiment_path: str, registered: list[str]) -> list[str]:
    """Delete the checkpoint folders Ray did not register (uploads a failure cut short, or resumed from
    before their registration); the names removed."""
    kept = {Path(path).name for path in registered}
    removed = [name for name in checkpoint_folders(filesystem, experiment_path) if name not in kept]
    for name in removed:
        try:
            filesystem.delete_dir(f"{experiment_path}/{name}")
        except FileNotFoundError:  # an empty folder: some stores (SeaweedFS) list one after its files are gone
            pass
    return removed
