"""Ray Tune sweeps over training jobs: the search-space, searcher and scheduler sections of a sweep
spec, and the Tuner that runs one training job per sampled config.

Ray 2.60 style: a trial is a Tune function trainable that builds its own `TorchTrainer` with
`EpochReportCallback` (Ray's `TuneReportCallback`, passing on epoch ends only: mid-epoch
checkpoints carry no validation metric). The per-trial driver holds no CPU, so the trials' training
workers alone take the cluster's CPUs, and at most as many trials run at once as have every worker
placed. ASHA compares trials at `epochs_done` rungs and stops the worse ones early.

An interrupted sweep resumes from its storage path (`Tuner.restore`): finished trials stay
finished; a trial that runs again launches its training job again, and Ray Train resumes that from
the job's own checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

EPOCHS_DONE = "epochs_done"  # ASHA's time attribute: what each report adds to the epoch metrics
DRIVER_RESOURCES = {"CPU": 0, "memory": 1}  # Ray refuses {"CPU": 0} alone as "no resources"
KINDS = ("choice", "uniform", "loguniform", "randint")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Dimension(_Section):
    """One swept value: exactly one of `choice: [a, b, …]`, `uniform: [low, high]`,
    `loguniform: [low, high]` (low > 0) or `randint: [low, high]` (high excluded, as in Tune)."""

    choice: list[Any] | None = Field(default=None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}")
        bounds = self.bounds
        if bounds is not None:
            low, high = bounds
            if not low < high:
                raise ValueError(f"{self.kind}: low must be below high, got [{low}, {high}]")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: both bounds must be positive, got [{low}, {high}]")
        return self

    @model_serializer(mode="wrap")
    def _given_only(self, handler) -> dict[str, Any]:
        """`{loguniform: [0.0001, 0.01]}`, as written: not the three kinds left out."""
        return {key: value for key, value in handler(self).items() if value is not None}

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @property
    def bounds(self) -> tuple[float, float] | None:
        return None if self.kind == "choice" else getattr(self, self.kind)

    def extremes(self) -> list[Any]:
        """The values that bound what the searcher can sample: every choice, or each end of a range."""
        if self.choice is not None:
            return list(self.choice)
        low, high = self.bounds
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def domain(self):  # -> ray.tune.search.sample.Domain
        from ray import tune

        if self.choice is not None:
            return tune.choice(list(self.choice))
        return getattr(tune, self.kind)(*self.bounds)

    def describe(self) -> str:
        values = self.choice if self.choice is not None else list(self.bounds)
        return f"{self.kind}({', '.join(map(repr, values))})"


class SearcherSpec(_Section):
    """How trial configs are sampled: at random, or by Optuna's TPE (which learns from finished trials)."""

    name: Literal["random", "optuna"] = "random"
    seed: int = Field(default=0, ge=0, description="the same seed samples the same configs")


class AshaSpec(_Section):
    """Asynchronous successive halving: at each rung (grace period × reduction factor^k epochs) a trial
    continues only if its metric is in the best 1/reduction_factor of the trials seen at that rung."""

    grace_period: int = Field(default=1, ge=1, description="epochs every trial trains before it can be stopped")
    reduction_factor: float = Field(default=2.0, gt=1)
    max_epochs: int | None = Field(default=None, ge=1,
                                   description="how long a trial trains at most; default: the job's optim.epochs")


@dataclass(frozen=True)
class Sweep:
    """A sweep ready to run: where it is stored and how it searches."""

    name: str
    storage_path: str  # bucket/prefix: the sweep's Tune experiment is <storage_path>/<name>
    filesystem: Any  # pyarrow.fs.FileSystem (carries no keys: it is saved with the experiment)
    space: dict[str, Dimension]
    searcher: SearcherSpec
    scheduler: AshaSpec
    max_epochs: int
    trials: int
    metric: str
    mode: Literal["max", "min"]
    max_concurrent_trials: int
    max_failures: int  # per trial, beyond what its job's own failure config rides out
    callbacks: list = field(default_factory=list)  # ray.tune.Callback

    @property
    def path(self) -> str:
        return f"{self.storage_path}/{self.name}"


def run_sweep(sweep: Sweep, trial: Callable[..., None], **parameters: Any):  # -> ray.tune.ResultGrid
    """Run the sweep to the end, or resume it from its storage path if it was interrupted. Every trial
    calls `trial(config, **parameters)` (the parameters pass through Ray's object store once)."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial, **parameters), DRIVER_RESOURCES)
    if tune.Tuner.can_restore(sweep.path, storage_filesystem=sweep.filesystem):
        tuner = tune.Tuner.restore(sweep.path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=sweep.filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={path: dimension.domain() for path, dimension in sweep.space.items()},
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.trials,
                search_alg=_searcher(sweep), scheduler=_scheduler(sweep),
                max_concurrent_trials=sweep.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=sweep.storage_path, storage_filesystem=sweep.filesystem,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures), callbacks=sweep.callbacks,
            ),
        )
    return tuner.fit()


def _searcher(sweep: Sweep):
    if sweep.searcher.name == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=sweep.searcher.seed))
    from ray.tune.search import BasicVariantGenerator

    # Tune applies max_concurrent_trials only to a `Searcher`; this generator takes its own limit. Without it
    # every trial's driver starts at once and their workers race for the cluster: the order trials train
    # in, and so what ASHA compares each against, is left to chance.
    return BasicVariantGenerator(random_state=sweep.searcher.seed, max_concurrent=sweep.max_concurrent_trials)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler

    # A trial that reaches max_epochs ends by itself (not stopped by ASHA): its driver then records the job's end.
    return ASHAScheduler(time_attr=EPOCHS_DONE, max_t=sweep.max_epochs, grace_period=sweep.scheduler.grace_period,
                         reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)


def epoch_report_callback(metric: str):  # -> ray.train.UserCallback
    """Ray's TuneReportCallback for a trial's TorchTrainer, passing on only the reports that carry the
    sweep's metric (epoch ends), with the epochs done for ASHA."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                epoch_end = {**metrics[0], EPOCHS_DONE: metrics[0]["epoch"] + 1}
                super().after_report(run_context, [epoch_end, *metrics[1:]], checkpoint)

    return EpochReportCallback()
