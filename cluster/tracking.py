"""MLflow tracking of training runs, from rank 0. The `tracking` section of a job spec lives here.

One job is one MLflow run: the driver finds or creates it (`jobs/tracking.py`) and hands every
worker a `RunRef`. Rank 0 logs through a `RunLogger`, which never blocks training and never
drops what it was given:

    log_metrics / log_image ──► outbox (ordered) ──► sender thread ──► MLflow server
                                   │                     └─ server down: keep, retry with backoff,
                                   │                        send in order when it answers
                                   └─ saved in every checkpoint, queued again by a restarted worker

System metrics (CPU, memory, disk, network, GPU where present) are sampled with MLflow's own
monitors and go through the same outbox, so an outage does not end them either.
"""

from __future__ import annotations

import base64
import collections
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

# MLflow's limits on names, tag keys and tag values.
MAX_NAME_LENGTH = 250
MAX_TAG_VALUE_LENGTH = 5000
MAX_METRICS_PER_BATCH = 1000
# Requests from the sender fail fast: the outbox, not MLflow's client, rides out an outage.
WORKER_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# Errors that resending cannot fix: the entry is dropped with a warning instead of blocking the rest.
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED",
                              "BAD_REQUEST", "INVALID_STATE"})
RETRY_MAX_S = 15.0
SYSTEM_SAMPLE_INTERVAL_S = 10.0


class TrackingSpec(BaseModel):
    """Where a job's MLflow run goes and how it is labelled."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH,
                                   description="MLflow experiment; default: the job name")
    run_name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH,
                                 description="default: the job name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags on the run")
    metrics_every_steps: int = Field(default=10, ge=1, description="log loss, LR and img/s every N steps")
    system_metrics: bool = Field(default=True, description="CPU, memory, disk, network and GPU use")


@dataclass(frozen=True)
class RunRef:
    """The job's MLflow run, as workers receive it (no credentials: the server proxies artifacts)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    started_s: float  # the run's start (Unix time): system metrics are stepped in seconds from it

    @property
    def url(self) -> str:
        return self.page()

    def page(self, tab: str = "") -> str:
        """The run's page in the MLflow UI (a tab of it, e.g. "model-metrics"), in the model-training view."""
        return ui_url(self.tracking_uri, f"experiments/{self.experiment_id}/runs/{self.run_id}/{tab}".rstrip("/"))


def ui_url(tracking_uri: str, path: str) -> str:
    """A page of the MLflow UI, opened in its model-training view. MLflow 3's UI opens every page in its GenAI
    view (traces, prompts, judges) unless the browser chose otherwise before, and then the experiment's
    `mlflow.experimentKind` tag is not consulted: only the link's `workflowType` says which view to open."""
    return f"{tracking_uri.rstrip('/')}/#/{path}?workflowType=machine_learning"


@dataclass(frozen=True)
class _Metrics:
    values: tuple[tuple[str, float, int, int], ...]  # (key, value, timestamp ms, step)


@dataclass(frozen=True)
class _Artifact:
    path: str  # within the run's artifacts, e.g. plots/training_curves.png
    data: bytes


class RunLogger:
    """Rank 0's ordered, outage-proof MLflow logging for one run."""

    def __init__(self, run: RunRef, *, pending: list[dict] | None = None, system_metrics: bool = False) -> None:
        from mlflow import MlflowClient

        self.run = run
        self._client = MlflowClient(run.tracking_uri)
        self._outbox: collections.deque[_Metrics | _Artifact] = collections.deque(map(_entry, pending or []))
        self._wake = threading.Condition()
        self._closing = False
        self._sender = threading.Thread(target=self._send_forever, name="mlflow-outbox", daemon=True)
        self._sender.start()
        self._sampler = _SystemSampler(self) if system_metrics else None

    # -- what training calls ---------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        now = int(time.time() * 1000)
        self._put(_Metrics(tuple((key, float(value), now, step) for key, value in metrics.items())))

    def log_artifact(self, path: str, data: bytes) -> None:
        self._put(_Artifact(path, data))

    def last_step(self, key: str) -> int:
        """The latest step of `key` on the server or waiting in the outbox (-1: none, or the server does not
        answer): a restarted worker does not log again what it redoes."""
        waiting = [value[3] for entry in list(self._outbox) if isinstance(entry, _Metrics)
                   for value in entry.values if value[0] == key]
        try:
            logged = [metric.step for metric in self._client.get_metric_history(self.run.run_id, key)]
        except Exception as error:  # noqa: BLE001 - at worst an epoch is logged twice
            log.debug("could not read %s of run %s: %s", key, self.run.run_id, error)
            logged = []
        return max(waiting + logged, default=-1)

    def pending(self) -> list[dict]:
        """What is not yet on the server, as JSON: saved with a checkpoint, passed back as `pending=`."""
        with self._wake:
            return [_record(entry) for entry in self._outbox]

    def close(self, *, timeout_s: float) -> bool:
        """Stop sampling, send what is left (waiting up to `timeout_s` for the server); True if all went."""
        if self._sampler is not None:
            self._sampler.stop()
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._sender.join(timeout_s)
        left = len(self._outbox)
        if left and timeout_s > 0:
            log.error("MLflow at %s did not answer for %.0f s: %d entries of run %s were not sent",
                      self.run.tracking_uri, timeout_s, left, self.run.run_id)
        return left == 0

    # -- the sender ------------------------------------------------------------------------------
    def _put(self, entry: _Metrics | _Artifact) -> None:
        with self._wake:
            self._outbox.append(entry)
            self._wake.notify_all()

    def _send_forever(self) -> None:
        failures, outage_started = 0, 0.0
        while True:
            with self._wake:
                while not self._outbox and not self._closing:
                    self._wake.wait()
                if not self._outbox:
                    return
                entry = self._outbox[0]
                if isinstance(entry, _Metrics):  # consecutive metric entries go as one request
                    entry = _merge(self._outbox)
            try:
                self._send(entry)
            except Exception as error:  # noqa: BLE001 - any failure to send is either permanent or retried
                if getattr(error, "error_code", None) in PERMANENT_ERRORS:
                    log.warning("MLflow refused an entry for run %s, dropping it: %s", self.run.run_id, error)
                    self._pop(entry)
                    continue
                if failures == 0:
                    outage_started = time.monotonic()
                    log.warning("MLflow at %s does not answer (%s); training goes on, and what is logged meanwhile "
                                "is kept and sent in order when it answers", self.run.tracking_uri,
                                str(error).splitlines()[0][:200])
                failures += 1
                with self._wake:
                    self._wake.wait(min(RETRY_MAX_S, 0.5 * 2 ** min(failures, 6)))
                continue
            self._pop(entry)
            if failures:
                log.warning("MLflow answers again after %.0f s: sending the %d entries kept meanwhile",
                            time.monotonic() - outage_started, len(self._outbox) + 1)
                failures = 0

    def _pop(self, sent: _Metrics | _Artifact) -> None:
        with self._wake:
            count = len(sent.values) if isinstance(sent, _Metrics) else 1
            while count > 0:
                head = self._outbox.popleft()
                count -= len(head.values) if isinstance(head, _Metrics) else 1

    def _send(self, entry: _Metrics | _Artifact) -> None:
        if isinstance(entry, _Artifact):
            with tempfile.TemporaryDirectory(prefix="compound-artifact-") as directory:
                local = Path(directory) / Path(entry.path).name
                local.write_bytes(entry.data)
                folder = str(Path(entry.path).parent)
                self._client.log_artifact(self.run.run_id, str(local), None if folder == "." else folder)
            return
        from mlflow.entities import Metric

        values = entry.values
        for start in range(0, len(values), MAX_METRICS_PER_BATCH):
            chunk = values[start:start + MAX_METRICS_PER_BATCH]
            self._client.log_batch(self.run.run_id, metrics=[Metric(*value) for value in chunk], synchronous=True)


def _merge(outbox: collections.deque) -> _Metrics:
    """The leading metric entries as one (up to a batch); `_pop` removes exactly those."""
    values: list = []
    for entry in outbox:
        if not isinstance(entry, _Metrics) or len(values) + len(entry.values) > MAX_METRICS_PER_BATCH:
            break
        values += entry.values
    return _Metrics(tuple(values)) if values else outbox[0]


def _record(entry: _Metrics | _Artifact) -> dict:
    if isinstance(entry, _Metrics):
        return {"metrics": [list(value) for value in entry.values]}
    return {"artifact": entry.path, "data": base64.b64encode(entry.data).decode()}


def _entry(record: dict) -> _Metrics | _Artifact:
    if "metrics" in record:
        return _Metrics(tuple((k, float(v), int(t), int(s)) for k, v, t, s in record["metrics"]))
    return _Artifact(record["artifact"], base64.b64decode(record["data"]))


class _SystemSampler:
    """MLflow's system-metric monitors, sampled every few seconds into the outbox (`system/…`)."""

    def __init__(self, logger: RunLogger) -> None:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.logger = logger
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:  # only where NVIDIA's management library finds a GPU
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception as error:  # noqa: BLE001 - no pynvml or no GPU: CPU metrics only
            log.debug("no GPU metrics: %s", error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _sample_forever(self) -> None:
        while not self._stop.wait(SYSTEM_SAMPLE_INTERVAL_S):
            metrics: dict[str, float] = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                metrics |= {f"system/{key}": value for key, value in monitor.aggregate_metrics().items()}
                monitor.clear_metrics()
            # step: seconds into the run, so a chart reads as time and a restarted worker continues it
            self.logger.log_metrics(metrics, step=int(time.time() - self.logger.run.started_s))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
