"""A 4-trial sweep against the same 4 trials run one after another as plain jobs, on this machine.

- **sweep**: `compound sweep run jobs/examples/b0-cpu-sweep.yaml` (under a fresh name) on a local stack
  this benchmark starts: 4 trials of the smoke job (B0 at 64 px, 2 CPU workers, 3 epochs), ASHA
  stopping the worse trials after their first epoch. Wall time of the command.
- **one after another**: each of the sweep's 4 sampled configs as a job of its own
  (`compound job run`, the smoke job with the trial's values), to the end, one after another. The
  sum of their wall times.

Both sides pay the same start-up per trial (a Ray Train worker group); the sweep saves what ASHA
cuts. Prints both and the ratio (sweep ÷ one after another).

    python tests/benchmarks/bench_sweep.py [--keep-stack]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SWEEP_SPEC = REPO / "jobs" / "examples" / "b0-cpu-sweep.yaml"
COMPOUND = str(Path(sys.executable).with_name("compound"))


def timed(command: list[str]) -> tuple[float, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOUND_")}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from local_stack import local_stack, write_digits

    from jobs.s3 import s3_access

    with local_stack("csweep", keep=args.keep_stack) as (stack, settings):
        home = stack.home
        write_digits(s3_access(settings), resolution=64, shard_mb=0.25)
        sweep = yaml.safe_load(SWEEP_SPEC.read_text())
        sweep["name"] = f"bench-sweep-{uuid.uuid4().hex[:6]}"
        sweep["job"] = str(SWEEP_SPEC.with_name(sweep["job"]))
        spec_path = home / "sweep.yaml"
        spec_path.write_text(yaml.safe_dump(sweep))
        sweep_s, out = timed([COMPOUND, "sweep", "run", str(spec_path), "--json", "--home", str(home)])
        outcome = json.loads([line for line in out.splitlines() if line.startswith('{"sweep"')][-1])
        print(f"sweep: {len(outcome['trials'])} trials in {sweep_s:.1f} s: "
              + ", ".join(f"{t['trial']} {t['status']} after {t['epochs']} epoch(s)" for t in outcome["trials"]))

        job = yaml.safe_load(Path(sweep["job"]).read_text())
        plain_s = 0.0
        for trial in outcome["trials"]:
            spec = json.loads(json.dumps(job))
            spec["name"] = f"bench-plain-{uuid.uuid4().hex[:6]}"
            for path, value in trial["config"].items():
                section, leaf = path.split(".")
                spec[section][leaf] = value
            job_path = home / f"{spec['name']}.yaml"
            job_path.write_text(yaml.safe_dump(spec))
            seconds, _ = timed([COMPOUND, "job", "run", str(job_path), "--json", "--home", str(home)])
            print(f"plain job with the config of {trial['trial']}: {seconds:.1f} s")
            plain_s += seconds
        print(f"\n{'4-trial sweep (ASHA)':40}{sweep_s:>8.1f} s\n{'the same 4 trials one after another':40}"
              f"{plain_s:>8.1f} s\n{'ratio sweep / one after another':40}{sweep_s / plain_s:>8.2f}")



if __name__ == "__main__":
    main()
