"""Our smoke job's training against what a user would otherwise write: torchvision's B0 under torchrun.

- **ours**: `compound job run SPEC --json` on a local stack this benchmark starts, SPEC being
  `jobs/examples/b0-cpu-smoke.yaml` as it is (EfficientNet-B0 at 64 px, batch 16 per worker, 2 Ray
  Train workers × 1 CPU, 1 loader worker each, the digits shards streamed from the local S3 store,
  random-resized-crop augmentation, AdamW, label smoothing, channels_last), except for a fresh job
  name per run, `optim.epochs` from `--epochs` and `checkpoint: {at_epoch_end: false}` (one checkpoint,
  after the last epoch: the plain script writes none). Its figure is the job's own per-epoch
  `train_images_per_s`: real samples of all ranks over the ranks' mean training time, evaluation left out.
- **plain**: `plain_ddp_b0.py` (next to this file) under `torchrun --standalone`: torchvision's
  `efficientnet_b0`, `ImageFolder` over the same train images unpacked to PNG files on local disk,
  `DistributedSampler` + `DataLoader`, the same transforms, optimiser settings, label smoothing,
  batch, loader workers, threads and epochs, all read from the same spec; gloo DDP. It measures
  img/s per epoch the same way. It runs twice: in the default memory format and in channels_last
  (model and inputs). What it leaves out costs no training time: evaluation (untimed on both sides),
  a learning-rate schedule, and sparing norms and biases from weight decay.

Loader start-up is timed alike: on both sides the loader workers start (fork, first data read) in
the first epoch, which is not counted, and in no counted epoch. Ours starts the next epoch's loader
workers during evaluation, untimed; the plain script keeps its DataLoader workers from epoch to epoch
(`persistent_workers=True`). What still differs: ours has an epoch's first batches ready when the
epoch starts (made during evaluation), the plain script makes its first ones inside its timed epoch (it
has no evaluation to hide them behind): a batch of PNG files per worker, tens of milliseconds here.

Each side's figure is the median over the epochs after the first (the first pays for start-up and
warm-up). Runs are interleaved round by round (the order reversed every other round); a ratio is
the median of the per-round ratios, printed with their range and "met" or "MISSED". Both sides have
1 torch thread and OMP_NUM_THREADS=1 per process. Ours also brings its own allocator settings
(`cluster.train.trainer.ALLOCATOR_ENV`); the plain script runs with glibc's defaults, as a user's would.

On a shared machine the figures are only as good as the machine was quiet. Each run waits (up to
`--wait-quiet` seconds) until everything else uses less than QUIET_CORES, and the "others" column
says how many cores everything else used during the runs (ForeignLoad): about 0.2 is this machine
at rest (the idle stacks); more means the run was contended and its figures understate it. Under
contention the two sides do not suffer alike: with the kernel's autogroup scheduling CPU is shared
between sessions first, and Ray runs all its workers (at nice 15) in the Ray head's session, while
torchrun gives each rank a session of its own.

Starts its own local stack in a temporary state dir on free ports, and stops it at the end
(`--keep-stack` leaves it running and says how to stop it).

    python tests/benchmarks/bench_training.py [--epochs 3 --rounds 3 --shard-mb 0.25 --wait-quiet 120 --keep-stack]

Bars: ours / plain >= 1.2 (default memory format), ours / plain >= 1.0 (channels_last).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import psutil
import yaml
from local_stack import export_image_folder, local_stack, stack_env, write_digits
from rounds import DEFAULT_ROUNDS, Bar, bar_line, ratios, round_order, spread

if TYPE_CHECKING:
    from jobs.spec import JobSpec

log = logging.getLogger("bench_training")

REPO = Path(__file__).resolve().parents[2]
SMOKE_SPEC = REPO / "jobs" / "examples" / "b0-cpu-smoke.yaml"
PLAIN_SCRIPT = Path(__file__).resolve().with_name("plain_ddp_b0.py")
RUNS = ("ours", "plain", "plain-cl")
STRIDE_WARNING = "Grad strides do not match bucket view strides"
BARS = {"plain": Bar(">=", 1.2), "plain-cl": Bar(">=", 1.0)}  # ours / plain
LABELS = {"ours": "ours (compound job run)", "plain": "plain torchrun, default format",
          "plain-cl": "plain torchrun, channels_last"}
LOG_TAIL_CHARS = 4000
QUIET_CORES = 0.5  # CPU use by everything else below which a run may start
QUIET_SAMPLE_S = 5.0
FOREIGN_SAMPLE_S = 1.0


class ForeignLoad:
    """The CPU everything else used during a run, in cores: busy time of the machine minus the CPU time
    of the run's processes (the launched command and its descendants, processes in `sessions`, this
    benchmark). Sampled every FOREIGN_SAMPLE_S in a thread. A process of ours that ends between samples
    leaves its last slice to "foreign": a small overestimate. With 2 cores, 0.5 foreign cores take about
    a quarter of what a run could use."""

    def __init__(self, sessions: set[int]) -> None:
        self.sessions = sessions
        self.roots: set[int] = set()
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add_root(self, pid: int) -> None:
        """Count `pid` and its descendants as the run's (torchrun gives each rank a session of its own)."""
        self.roots = self.roots | {pid}

    @property
    def cores(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        busy_before, at_before = self._busy(), time.monotonic()
        _, seen = self._ours(me, None)
        while not self._stop.wait(FOREIGN_SAMPLE_S):
            ours, seen = self._ours(me, seen)
            busy, now = self._busy(), time.monotonic()
            self.samples.append(max(0.0, busy - busy_before - ours) / (now - at_before))
            busy_before, at_before = busy, now

    @staticmethod
    def _busy() -> float:
        """CPU seconds the machine has been busy (guest time is already inside user and nice)."""
        times = psutil.cpu_times()
        return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _ours(self, me: int, seen: dict[tuple[int, float], float] | None) -> tuple[float, dict]:
        """CPU seconds our processes used since the last call (all of it for those new since), and the new
        state: (pid, start time) → CPU seconds. `seen` None: a baseline, nothing counted."""
        used, now = 0.0, {}
        pids = {me}
        for root in self.roots:
            try:
                pids |= {root, *(child.pid for child in psutil.Process(root).children(recursive=True))}
            except psutil.Error:
                continue
        for process in psutil.process_iter():
            try:
                if process.pid not in pids and os.getsid(process.pid) not in self.sessions:
                    continue
                key = (process.pid, process.create_time())
                times = process.cpu_times()
            except (psutil.Error, OSError):
                continue
            now[key] = times.user + times.system
            if seen is not None:
                used += now[key] - seen.get(key, 0.0)
        return used, now


@dataclass(frozen=True)
class RunResult:
    """One training run: per-epoch img/s and what was trained on."""

    epoch_images_per_s: tuple[float, ...]
    steps_per_epoch: int
    samples_per_epoch: int
    seconds: float  # wall time of the whole command, start-up and evaluation included
    foreign_cores: float = 0.0  # CPU everything else used meanwhile (ForeignLoad)
    stride_warnings: int = 0  # workers that logged DDP's "Grad strides do not match bucket view strides"

    @property
    def images_per_s(self) -> float:
        """Median over the epochs after the first (which pays for start-up and warm-up)."""
        return statistics.median(self.epoch_images_per_s[1:])


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait until the machine's CPU use (cores busy, over QUIET_SAMPLE_S) is below QUIET_CORES, or
    `max_wait_s` has passed; returns the last measured use. On a shared machine another person's
    job can still start during a run: interleaved rounds and the ratios' range show how much that did."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = psutil.cpu_percent(interval=QUIET_SAMPLE_S) / 100 * (os.cpu_count() or 1)
        if busy <= QUIET_CORES or time.monotonic() >= deadline:
            return busy


def bench_spec(epochs: int, name: str) -> dict[str, Any]:
    """The smoke spec with a fresh name, `epochs` epochs and one checkpoint, after the last epoch: the
    plain script writes none, and an upload in the background would be timed with the next epoch."""
    spec = yaml.safe_load(SMOKE_SPEC.read_text())
    spec["name"] = name
    spec["optim"]["epochs"] = epochs
    spec["checkpoint"] = {"at_epoch_end": False}
    return spec


def launch(command: list[str], *, out: Path, foreign: ForeignLoad, env: dict[str, str] | None = None) -> int:
    """Run `command` in a session of its own, stdout and stderr to `out`; returns its exit code.

    A session of its own, as the Ray head's workers have: with the kernel's autogroup scheduling, CPU is
    shared between sessions first, then between the processes of each.
    """
    with out.open("w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        foreign.add_root(process.pid)
        try:
            return process.wait()
        finally:
            if process.poll() is None:  # interrupted: end the whole session we started
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()


def run_ours(spec_path: Path, *, home: Path, run_dir: Path, foreign: ForeignLoad) -> RunResult:
    """`compound job run SPEC --json` against the benchmark's stack."""
    command = [str(Path(sys.executable).with_name("compound")), "job", "run", str(spec_path), "--json",
               "--home", str(home)]
    log_path = run_dir / "job.log"
    started = time.perf_counter()
    code = launch(command, out=log_path, foreign=foreign, env=stack_env())
    seconds = time.perf_counter() - started
    text = log_path.read_text()
    if code != 0:
        raise RuntimeError(f"compound job run exited with {code}:\n{text[-LOG_TAIL_CHARS:]}")
    outcome = json.loads(next(line for line in reversed(text.splitlines()) if line.startswith('{"job"')))
    epochs = outcome["epochs"]
    return RunResult(epoch_images_per_s=tuple(e["train_images_per_s"] for e in epochs),
                     steps_per_epoch=max(e["step"] for e in epochs),
                     samples_per_epoch=epochs[-1]["train_samples_epoch"], seconds=seconds,
                     stride_warnings=text.count(STRIDE_WARNING))


def plain_arguments(spec: JobSpec) -> list[str]:
    """The plain script's options that mirror the spec: data, augmentation, optimiser, threads."""
    from cluster.train.trainer import threads_per_worker

    augment = spec.data.augment
    if (augment.policy != "none" or augment.random_erasing or augment.mixup_alpha or augment.cutmix_alpha
            or not augment.random_resized_crop):
        raise ValueError("the plain script mirrors random-resized-crop (+ flip) only; the spec asks for more")
    if spec.optim.optimizer != "adamw" or spec.optim.grad_accumulation != 1 or spec.precision.dtype != "fp32":
        raise ValueError("the plain script mirrors fp32 AdamW without gradient accumulation only")
    return [
        "--epochs", str(spec.optim.epochs), "--resolution", str(spec.model.resolution),
        "--batch-size", str(spec.data.batch_size), "--loader-workers", str(spec.data.loader_workers),
        "--crop-scale", *(str(s) for s in augment.crop_scale),
        *(["--horizontal-flip"] if augment.horizontal_flip else []),
        "--lr", str(spec.peak_lr), "--weight-decay", str(spec.optim.weight_decay),
        "--label-smoothing", str(spec.optim.label_smoothing), "--threads", str(threads_per_worker(spec)),
    ]


def run_plain(spec: JobSpec, *, images: Path, channels_last: bool, run_dir: Path,
              foreign: ForeignLoad) -> tuple[RunResult, dict]:
    """plain_ddp_b0.py under torchrun, in a session of its own; returns the result and rank 0's setup."""
    from cluster.train.trainer import threads_per_worker

    result_path, log_path = run_dir / "result.json", run_dir / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={spec.scaling.num_workers}", str(PLAIN_SCRIPT), str(images),
               *plain_arguments(spec), "--result", str(result_path), *(["--channels-last"] if channels_last else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker(spec))}
    started = time.perf_counter()
    code = launch(command, out=log_path, foreign=foreign, env=env)
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"torchrun exited with {code}:\n{log_path.read_text()[-LOG_TAIL_CHARS:]}")
    raw = json.loads(result_path.read_text())
    epochs = raw["epochs"]
    result = RunResult(epoch_images_per_s=tuple(e["train_images_per_s"] for e in epochs),
                       steps_per_epoch=max(e["steps"] for e in epochs),
                       samples_per_epoch=epochs[-1]["train_samples_epoch"], seconds=seconds)
    return result, {key: raw[key] for key in ("world_size", "threads", "omp_num_threads", "nice", "persistent_workers")}


def print_summary(results: dict[str, list[RunResult]]) -> None:
    """The table, the ratios and the bars."""
    ours = results["ours"]
    print(f"\n{'over rounds':34}{'img/s: median [range]':>24}{'last round, per epoch':>30}{'steps/ep':>10}"
          f"{'samples/ep':>12}{'run s':>8}{'others':>8}")
    for name in RUNS:
        runs = results[name]
        per_epoch = " ".join(f"{v:.0f}" for v in runs[-1].epoch_images_per_s)
        print(f"{LABELS[name]:34}{spread([r.images_per_s for r in runs], fmt='.1f'):>24}{per_epoch:>30}"
              f"{runs[-1].steps_per_epoch:>10}{runs[-1].samples_per_epoch:>12}"
              f"{statistics.median(r.seconds for r in runs):>8.0f}"
              f"{statistics.median(r.foreign_cores for r in runs):>8.2f}")
    print(f"\nours' workers that warned 'Grad strides do not match bucket view strides' (a weight whose gradient "
          f"comes back laid out otherwise, copied into DDP's bucket): {sum(r.stride_warnings for r in ours)}")
    for name, bar in BARS.items():
        per_round = ratios([r.images_per_s for r in ours], [r.images_per_s for r in results[name]])
        print(bar_line(f"ours / {LABELS[name]}", per_round, bar, width=52))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is not counted (at least 2)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="runs of each of the three, interleaved")
    parser.add_argument("--shard-mb", type=float, default=0.25, help="target shard size of the digits, MB")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between runs, so that Ray's teardown does not overlap the next start")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help=f"before each run, wait up to this many seconds for the rest of the machine to use "
                             f"less than {QUIET_CORES} cores")
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack and the run folders behind")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first is not counted), got {args.epochs}")
    if args.rounds < 1 or args.shard_mb <= 0 or args.settle < 0 or args.wait_quiet < 0:
        parser.error("--rounds must be at least 1, --shard-mb positive, --settle and --wait-quiet not negative")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from cluster.train.trainer import threads_per_worker
    from jobs.s3 import s3_access
    from jobs.spec import load_job_spec

    with local_stack("cbench", keep=args.keep_stack) as (stack, settings):
        home = stack.home
        s3 = s3_access(settings)
        base = bench_spec(args.epochs, "bench-training")
        resolution = base["model"]["resolution"]
        manifest = write_digits(s3, resolution=resolution, shard_mb=args.shard_mb)
        images = home / "images" / "train"
        exported = export_image_folder(manifest, s3, images)
        train = manifest.split("train")
        if exported != train.samples:
            raise RuntimeError(f"exported {exported} images, but the train split holds {train.samples}")

        # One resolved spec tells the plain script everything it mirrors.
        spec_path = home / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(base, sort_keys=False))
        spec = load_job_spec(spec_path)
        plain_arguments(spec)  # fails now, not after our run, if the spec asks for what the plain script lacks
        print(f"digits at {resolution}px: {train.samples} train images in {len(train.shards)} shards "
              f"(target {args.shard_mb} MB), also unpacked as PNG files for ImageFolder; {spec.model.arch}, "
              f"batch {spec.data.batch_size} per worker, {spec.scaling.num_workers} workers x "
              f"{spec.scaling.cpus_per_worker:g} CPU, {spec.data.loader_workers} loader worker(s) each, "
              f"{threads_per_worker(spec)} torch thread(s) and OMP_NUM_THREADS={threads_per_worker(spec)} per "
              f"worker, {args.epochs} epochs per run (the first not counted), {args.rounds} interleaved round(s); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Loader start-up is in no counted "
              f"epoch on either side: ours starts the next epoch's loader during evaluation, the plain script "
              f"keeps its DataLoader workers (persistent_workers=True)")

        # The stack's services are part of our runs (Ray's workers run in the Ray head's session); during the
        # plain runs they idle, and what they use then counts as foreign.
        stack_sessions = {os.getsid(status.pid) for status in stack.status() if status.pid is not None}
        results: dict[str, list[RunResult]] = {name: [] for name in RUNS}
        for round_index in range(args.rounds):
            for name in round_order(RUNS, round_index):
                run_dir = home / "runs" / f"{name}-{round_index}"
                run_dir.mkdir(parents=True)
                busy = wait_for_quiet(args.wait_quiet)
                with ForeignLoad(stack_sessions if name == "ours" else set()) as foreign:
                    if name == "ours":
                        job_spec = bench_spec(args.epochs, f"bench-training-{uuid.uuid4().hex[:8]}")
                        (run_dir / "spec.yaml").write_text(yaml.safe_dump(job_spec, sort_keys=False))
                        result = run_ours(run_dir / "spec.yaml", home=home, run_dir=run_dir, foreign=foreign)
                        setup = f"{spec.scaling.num_workers} Ray workers, {spec.scaling.cpus_per_worker:g} CPU each"
                    else:
                        result, raw = run_plain(spec, images=images, channels_last=name == "plain-cl",
                                                run_dir=run_dir, foreign=foreign)
                        setup = (f"world {raw['world_size']}, {raw['threads']} thread(s), "
                                 f"OMP_NUM_THREADS={raw['omp_num_threads']}, nice {raw['nice']}, "
                                 f"persistent_workers={raw['persistent_workers']}")
                result = replace(result, foreign_cores=foreign.cores)
                results[name].append(result)
                log.info("round %d %-8s %6.1f img/s (epochs: %s)  %d steps/epoch  run %.0f s  (%s; others used "
                         "%.1f cores before, %.2f during)",
                         round_index + 1, name, result.images_per_s,
                         " ".join(f"{v:.1f}" for v in result.epoch_images_per_s), result.steps_per_epoch,
                         result.seconds, setup, busy, result.foreign_cores)
                time.sleep(args.settle)
        print_summary(results)



if __name__ == "__main__":
    main()
