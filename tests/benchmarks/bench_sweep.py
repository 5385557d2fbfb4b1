"""A 4-trial sweep against the same 4 trials run one after another as plain jobs, on this machine.

- **sweep**: what `compound sweep run jobs/examples/b0-cpu-sweep.yaml` runs (`jobs.sweep.run_sweep_job`),
  under a fresh name each round, on a local stack this benchmark starts: 4 trials of the smoke job (B0 at
  64 px, 2 CPU workers, 3 epochs), ASHA stopping the worse trials after their first epoch.
- **one after another**: each of the sweep's 4 sampled configs as a job of its own, what
  `compound job run` runs (`jobs.driver.run_job`: the smoke job with the trial's values), to the end,
  one after another. The sum of their times. The searcher is seeded, so every round's sweep samples the
  same 4 configs (checked).

What is timed, the same on both sides: each run call, from its start to its return, in a driver process
(this file again, with `--drive`) that has imported everything beforehand. The start of an interpreter
and its imports, which one `compound sweep run` would pay once and four `compound job run`s four times,
is left out of both. Inside the calls each side does what its command does: a plain job connects to
Ray, starts its Ray Train worker group, trains, records and disconnects; the sweep connects once and
starts a Tune trial with a worker group per trial. The sweep saves what ASHA cuts.

A round runs both sides, the order reversed every other round (the sweep first in the first round);
the ratio is the median of the rounds' ratios, printed with their range and the verdict.
Bar: sweep ÷ one after another ≤ 1.0 (the sweep costs no more than running its trials by hand).

    python tests/benchmarks/bench_sweep.py [--rounds 3 --keep-stack]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml
from local_stack import local_stack, stack_env, write_digits
from rounds import DEFAULT_ROUNDS, Bar, bar_line, ratios, round_order, spread

log = logging.getLogger("bench_sweep")

REPO = Path(__file__).resolve().parents[2]
SWEEP_SPEC = REPO / "jobs" / "examples" / "b0-cpu-sweep.yaml"
SIDES = ("sweep", "one after another")
BAR = Bar("<=", 1.0)  # sweep ÷ one after another
LOG_TAIL_CHARS = 4000


def drive(kind: str, specs: list[Path], *, home: Path, result: Path) -> None:
    """The driver process: run the sweep spec, or the job specs one after another, timing each call;
    writes [{"seconds": …, "trials": … (a sweep's)}] to `result`."""
    from infra.settings import load_settings

    settings = load_settings(home)  # first: it puts the stack's logins into the environment Ray and MLflow read
    # Imported before the clock starts, so that no timed call pays for them.
    import mlflow  # noqa: F401
    import ray.train.torch  # noqa: F401

    from jobs.driver import run_job
    from jobs.spec import load_job_spec, load_sweep_spec
    from jobs.sweep import run_sweep_job

    runs = []
    for path in specs:
        if kind == "sweep":
            sweep = load_sweep_spec(path)
            started = time.perf_counter()
            outcome = run_sweep_job(sweep, settings, source=str(path))
            runs.append({"seconds": time.perf_counter() - started, "trials": outcome.trials})
        else:
            job = load_job_spec(path)
            started = time.perf_counter()
            run_job(job, settings, source=str(path))
            runs.append({"seconds": time.perf_counter() - started})
    result.write_text(json.dumps(runs))


def run_driver(kind: str, specs: list[Path], *, home: Path, name: str) -> list[dict]:
    """`drive` in a process of its own, its output to `home/<name>.log`; what it wrote."""
    result, log_path = home / f"{name}.json", home / f"{name}.log"
    command = [sys.executable, __file__, "--drive", kind, *map(str, specs), "--home", str(home),
               "--result", str(result)]
    with log_path.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=stack_env(), check=False).returncode
    if code != 0:
        raise RuntimeError(f"the {kind} driver exited with {code}:\n{log_path.read_text()[-LOG_TAIL_CHARS:]}")
    return json.loads(result.read_text())


def trial_job(job: dict, config: dict, name: str) -> dict:
    """The base job with a trial's values ("optim.lr": … sets job["optim"]["lr"])."""
    spec = {**json.loads(json.dumps(job)), "name": name}
    for path, value in config.items():
        section, leaf = path.split(".")
        spec[section][leaf] = value
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="runs of each side, interleaved")
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    parser.add_argument("--drive", nargs="+", metavar="KIND_THEN_SPECS", help=argparse.SUPPRESS)  # driver process
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:
        kind, *specs = args.drive
        drive(kind, [Path(spec) for spec in specs], home=args.home, result=args.result)
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from jobs.s3 import s3_access

    with local_stack("csweep", keep=args.keep_stack) as (stack, settings):
        home = stack.home
        write_digits(s3_access(settings), resolution=64, shard_mb=0.25)
        sweep = yaml.safe_load(SWEEP_SPEC.read_text())
        sweep["job"] = str(SWEEP_SPEC.with_name(sweep["job"]))
        job = yaml.safe_load(Path(sweep["job"]).read_text())
        print(f"{SWEEP_SPEC.name}: {sweep['trials']} trials of {Path(sweep['job']).name}, {args.rounds} interleaved "
              "round(s); timed: each sweep or job call in an already started, already imported driver process "
              "(no interpreter or import start-up on either side)", flush=True)

        seconds: dict[str, list[float]] = {side: [] for side in SIDES}
        configs: list[dict] | None = None  # the sweep's sampled configs, the same every round
        for round_index in range(args.rounds):
            for side in round_order(SIDES, round_index):
                tag = f"{round_index}-{uuid.uuid4().hex[:6]}"
                if side == "sweep":
                    path = home / f"sweep-{tag}.yaml"
                    path.write_text(yaml.safe_dump({**sweep, "name": f"bench-sweep-{tag}"}))
                    [run] = run_driver("sweep", [path], home=home, name=path.stem)
                    sampled = [trial["config"] for trial in run["trials"]]
                    if configs is not None and sorted(map(json.dumps, sampled)) != sorted(map(json.dumps, configs)):
                        raise RuntimeError(f"round {round_index + 1}'s sweep sampled {sampled}, the first {configs}: "
                                           "the plain jobs would not run the same trials")
                    configs = sampled
                    seconds[side].append(run["seconds"])
                    log.info("round %d sweep: %.1f s: %s", round_index + 1, run["seconds"],
                             ", ".join(f"{t['trial']} {t['status']} after {t['epochs']} epoch(s)"
                                       for t in run["trials"]))
                else:
                    assert configs is not None, "the first round runs the sweep first"
                    paths = []
                    for index, config in enumerate(configs):
                        paths.append(home / f"plain-{tag}-{index}.yaml")
                        paths[-1].write_text(yaml.safe_dump(trial_job(job, config, f"bench-plain-{tag}-{index}")))
                    runs = run_driver("jobs", paths, home=home, name=f"plain-{tag}")
                    seconds[side].append(sum(run["seconds"] for run in runs))
                    log.info("round %d one after another: %.1f s (%s)", round_index + 1, seconds[side][-1],
                             " + ".join(f"{run['seconds']:.1f}" for run in runs))

        print(f"\n{'seconds: median [range]':44}")
        for side in SIDES:
            print(f"{side:44}{spread(seconds[side], fmt='.1f'):>24}")
        print(bar_line("sweep ÷ one after another", ratios(seconds["sweep"], seconds["one after another"]), BAR))


if __name__ == "__main__":
    main()
