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

Checkpoints are uploaded in the background (`CheckpointUploadMode.ASYNC`) through an upload
function that retries through a store outage for the S3 access's retry window.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


@dataclass
class Progress:
    """Where training is: the same on every rank."""

    epoch: int = 0
    step: int = 0  # micro-steps (loader batches) done in `epoch`
    optimizer_steps: int = 0
    tally: EpochTally = field(default_factory=EpochTally)  # this rank's
    history: list[dict] = field(default_factory=list)  # the metrics of every finished epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "optimizer_steps": self.optimizer_steps,
                "history": self.history}

    def next_epoch(self) -> Progress:
        return Progress(epoch=self.epoch + 1, optimizer_steps=self.optimizer_steps, history=self.history)

    @property
    def name(self) -> str:
        """The checkpoint folder's name: the same for the same point, so a re-run overwrites an orphan."""
        return f"{CHECKPOINT_PREFIX}{self.epoch:04d}-step{self.step:07d}"


def new_checkpoint_dir() -> Path:
    """A local folder for one checkpoint; Ray deletes it once uploaded."""
    return Path(tempfile.mkdtemp(prefix="compound-checkpoint-"))


def save_progress(directory: Path, progress: Progress, *, rank: int, spec_json: str,
                  mlflow_run_id: str | None = None) -> None:
    """Every rank: its RNG and tally; rank 0 also the shared progress and the spec."""
    torch.save({"rng": torch.get_rng_state(), "python_rng": random.getstate(), "tally": asdict(progress.tally)},
               directory / f"rank-{rank}.pt")
    if rank == 0:
        record = {"format": CHECKPOINT_FORMAT, **progress.state(), "spec": json.loads(spec_json),
                  "mlflow_run_id": mlflow_run_id}
        (directory / PROGRESS_FILE).write_text(json.dumps(record, indent=2))


def load_progress(directory: Path, *, rank: int) -> Progress:
    """The progress a checkpoint holds, with this rank's RNG restored and its tally."""
    record = json.loads((directory / PROGRESS_FILE).read_text())
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory} is not a compound training checkpoint (format {record.get('format')!r})")
    progress = Progress(epoch=record["epoch"], step=record["step"], optimizer_steps=record["optimizer_steps"],
                        history=record["history"])
    rank_file = directory / f"rank-{rank}.pt"
    if rank_file.is_file():
        state = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(state["rng"])
        random.setstate(state["python_rng"])
        progress.tally = EpochTally(**state["tally"])
    return progress


def stored_spec(directory: Path) -> dict:
    return json.loads((directory / PROGRESS_FILE).read_text())["spec"]


def upload_with_retries(window_s: float):
    """A `checkpoint_upload_fn` for `ray.train.report`: Ray's own upload, retried through an outage."""
    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        storage = ray.train.get_context().get_storage()
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
            except OSError as error:  # pyarrow raises OSError for S3 failures
                if time.monotonic() - started >= window_s:
                    raise OSError(f"could not upload checkpoint {checkpoint_dir_name} for {window_s:.0f} s "
                                  f"(the S3 retry window): {error}") from error
                log.warning("uploading checkpoint %s failed (%s); retrying", checkpoint_dir_name, error)
                time.sleep(backoff_s(attempt))
                attempt += 1

    return upload
