"""Orchestration overhead: one DDP training function under Ray Train's TorchTrainer and under torchrun.

`train_fn` is the same function for both launchers: EfficientNet-B0 wrapped in DDP over a gloo
process group, trained on synthetic tensors (no data loading), with the same torch thread count and
OMP_NUM_THREADS in every worker. Under Ray, `TorchTrainer(torch_config=TorchConfig(backend="gloo"))`
has set up the group before the function runs; under `torchrun --standalone --nproc-per-node N`
(this file, re-run with `--worker`) the function sets it up itself. Rank 0 writes its step times
and the wall-clock time its first step began to a JSON file.

- steady-state step time: median of rank 0's timed steps, after the warm-up steps. A DDP step ends
  with an all-reduce, so rank 0's time covers the slowest rank too. The CPU time of rank 0's whole
  process per step (its helper threads included) tells extra work from waiting for the CPU.
- start-up: from the launch (the `TorchTrainer.fit()` call / starting the torchrun process) to the
  first step beginning. Ray connects to a Ray head this benchmark started beforehand, so the
  cluster's own start is not counted; the worker group's start (controller and worker actors,
  process group, imports, model build) is, as is torchrun's (processes, rendezvous, imports, model
  build).
- end-to-end: from the launch until `fit()` returns / the torchrun process exits.

The launchers alternate round by round (the order reversed every other round) and the ratio is the
median of the per-round ratios, so drift on a shared machine cancels out; the range of those
ratios shows how noisy the machine was. Ray runs its workers at nice 15 (its default), torchrun's
run at the caller's; each launcher's workers get a session of their own (see `run_torchrun`).

Starts its own local stack in a temporary state dir on free ports, and stops it at the end.

    python tests/benchmarks/bench_orchestration.py [--resolution 64 --batch 32 --warmup 5 --steps 50 --rounds 5]

Bar: steady-state step time Ray / torchrun <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Only what train_fn needs is imported at the top: torchrun's workers import this file, and
# importing Ray or the stack there would count against torchrun's start-up.
import torch
import torch.distributed as dist
import torch.nn.functional as F
from local_stack import local_stack
from torch.nn.parallel import DistributedDataParallel

import effnet

log = logging.getLogger("bench_orchestration")
NUM_CLASSES = 10
IMAGE_CHANNELS = 3
BAR = 1.05
LAUNCHERS = ("ray", "torchrun")
LOG_TAIL_CHARS = 4000


def train_fn(config: dict[str, Any]) -> None:
    """DDP training on synthetic tensors; rank 0 writes its timings to `config["result_path"]`."""
    torch.set_num_threads(config["threads"])
    owns_group = not dist.is_initialized()  # Ray's TorchTrainer has initialised it; torchrun has not
    if owns_group:
        dist.init_process_group("gloo")  # env:// rendezvous from torchrun's variables
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = DistributedDataParallel(effnet.build(config["model"], num_classes=NUM_CLASSES).train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    resolution = config["resolution"]
    images = torch.randn(config["batch"], IMAGE_CHANNELS, resolution, resolution)  # (B, 3, H, W) per rank
    labels = torch.randint(0, NUM_CLASSES, (config["batch"],))

    first_step_at = time.time()  # wall clock: compared with the launcher's launch time
    step_s, step_cpu_s = [], []
    for step in range(config["warmup"] + config["steps"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        F.cross_entropy(model(images), labels).backward()  # DDP all-reduces the gradients here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= config["warmup"]:
            step_s.append(time.perf_counter() - start)
            step_cpu_s.append(time.process_time() - start_cpu)

    if rank == 0:
        result = {"first_step_at": first_step_at, "step_s": step_s, "step_cpu_s": step_cpu_s,
                  "world_size": dist.get_world_size(), "threads": torch.get_num_threads(),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)}
        Path(config["result_path"]).write_text(json.dumps(result))
    if owns_group:
        dist.destroy_process_group()


@dataclass(frozen=True)
class RunResult:
    """One launch of `train_fn`, as rank 0 saw it."""

    step_s: float  # median wall seconds per timed step
    step_cpu_s: float  # median CPU seconds per timed step of rank 0's process
    startup_s: float  # launch -> first step began
    total_s: float  # launch -> launcher returned
    setup: tuple[int, int, str | None]  # world size, torch threads, OMP_NUM_THREADS
    nice: int

    @classmethod
    def read(cls, path: Path, *, launched_at: float, returned_at: float) -> RunResult:
        raw = json.loads(path.read_text())
        return cls(step_s=statistics.median(raw["step_s"]), step_cpu_s=statistics.median(raw["step_cpu_s"]),
                   startup_s=raw["first_step_at"] - launched_at, total_s=returned_at - launched_at,
                   setup=(raw["world_size"], raw["threads"], raw["omp_num_threads"]), nice=raw["nice"])


def run_ray(config: dict[str, Any], *, workers: int, storage: Path, name: str) -> tuple[float, float]:
    """Run `train_fn` with TorchTrainer on the connected cluster; returns (launched_at, returned_at)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    launched_at = time.time()
    trainer.fit()
    return launched_at, time.time()


def run_torchrun(config: dict[str, Any], *, workers: int, run_dir: Path) -> tuple[float, float]:
    """Run this file's `train_fn` under torchrun; returns (launched_at, returned_at)."""
    config_path, log_path = run_dir / "config.json", run_dir / "torchrun.log"
    config_path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               __file__, "--worker", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
    with log_path.open("w") as out:
        launched_at = time.time()
        # A session of its own, as Ray's workers have under `ray start`: with the kernel's autogroup
        # scheduling, CPU is shared between sessions first, then between the processes of each.
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
                              start_new_session=True).returncode
        returned_at = time.time()
    if code != 0:
        raise RuntimeError(f"torchrun exited with {code}:\n{log_path.read_text()[-LOG_TAIL_CHARS:]}")
    return launched_at, returned_at


def print_summary(results: dict[str, list[RunResult]], images_per_step: int) -> None:
    setups = {r.setup for runs in results.values() for r in runs}
    if len(setups) != 1:
        raise RuntimeError(f"the launchers' workers differ in (world size, threads, OMP_NUM_THREADS): {setups}")
    ratios = sorted(r.step_s / t.step_s for r, t in zip(results["ray"], results["torchrun"], strict=True))
    ratio = statistics.median(ratios)

    def medians(field: str) -> tuple[float, float]:
        ray_value, torchrun_value = (statistics.median(getattr(r, field) for r in results[n]) for n in LAUNCHERS)
        return ray_value, torchrun_value

    print(f"{'':32}{'ray':>10}{'torchrun':>10}{'ray/torchrun':>14}  {'[range]':16} bar")
    ray_s, torchrun_s = medians("step_s")
    print(f"{'steady-state step ms':32}{ray_s * 1e3:>10.1f}{torchrun_s * 1e3:>10.1f}{ratio:>14.3f}  "
          f"[{ratios[0]:.3f}, {ratios[-1]:.3f}]   <= {BAR}  {'met' if ratio <= BAR else 'MISSED'}")
    rows = (("  CPU ms per step (rank 0)", "step_cpu_s", 1e3), ("start-up s (launch->1st step)", "startup_s", 1.0),
            ("end-to-end s (launch->return)", "total_s", 1.0))
    for label, field, scale in rows:
        ray_value, torchrun_value = medians(field)
        print(f"{label:32}{ray_value * scale:>10.1f}{torchrun_value * scale:>10.1f}{ray_value / torchrun_value:>14.2f}")
    print(f"{'img/s, all workers':32}{images_per_step / ray_s:>10.1f}{images_per_step / torchrun_s:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0", choices=list(effnet.VARIANTS))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each launcher, interleaved")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between runs, so that Ray's teardown does not overlap the next start")
    parser.add_argument("--worker", metavar="CONFIG_JSON", type=Path, help=argparse.SUPPRESS)  # torchrun's side
    args = parser.parse_args()
    if args.worker is not None:
        train_fn(json.loads(args.worker.read_text()))
        return
    for flag in ("resolution", "batch", "workers", "threads", "steps", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.settle < 0:
        parser.error("--warmup and --settle must not be negative")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cores = os.cpu_count() or 1
    if args.workers > cores:
        parser.error(f"--workers {args.workers}: the local Ray head has {cores} CPUs, one per worker")
    if args.workers * args.threads > cores:
        log.warning("%d workers x %d threads oversubscribe %d cores", args.workers, args.threads, cores)

    from infra.settings import RAY_CLIENT_ENV

    os.environ.update(RAY_CLIENT_ENV)  # before Ray is imported: it reads these at import and init
    import ray
    import ray.train.torch  # here, so that the first round does not pay for it

    with local_stack("cbench") as (stack, settings):
        home = stack.home
        try:
            # The same OpenMP pool on both sides (Ray's default would follow the worker's CPUs).
            ray.init(address=settings.ray_address, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
            print(f"{args.model} DDP (gloo), {args.workers} workers x {args.threads} thread(s), {args.resolution}px, "
                  f"batch {args.batch} per worker, synthetic tensors, {args.warmup} warm-up + {args.steps} timed steps, "
                  f"{args.rounds} interleaved rounds; torch {torch.__version__}, ray {ray.__version__}; "
                  f"load average {os.getloadavg()[0]:.1f} on {cores} cores")

            base = {"model": args.model, "resolution": args.resolution, "batch": args.batch, "threads": args.threads,
                    "warmup": args.warmup, "steps": args.steps}
            results: dict[str, list[RunResult]] = {name: [] for name in LAUNCHERS}
            for round_index in range(args.rounds):
                for name in LAUNCHERS if round_index % 2 == 0 else reversed(LAUNCHERS):
                    run_dir = home / "runs" / f"{name}-{round_index}"
                    run_dir.mkdir(parents=True)
                    config = {**base, "result_path": str(run_dir / "result.json")}
                    if name == "ray":
                        launched_at, returned_at = run_ray(config, workers=args.workers, storage=home / "ray-storage",
                                                           name=run_dir.name)
                    else:
                        launched_at, returned_at = run_torchrun(config, workers=args.workers, run_dir=run_dir)
                    result = RunResult.read(Path(config["result_path"]), launched_at=launched_at, returned_at=returned_at)
                    results[name].append(result)
                    log.info("round %d %-9s step %6.1f ms (CPU %6.1f ms)  start-up %5.1f s  end-to-end %5.1f s  "
                             "(world %d, %d thread(s), OMP_NUM_THREADS=%s, nice %d, load %.1f)",
                             round_index + 1, name, result.step_s * 1e3, result.step_cpu_s * 1e3, result.startup_s,
                             result.total_s, *result.setup, result.nice, os.getloadavg()[0])
                    time.sleep(args.settle)  # Ray ends its worker processes after fit() returns
            print_summary(results, images_per_step=args.batch * args.workers)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
