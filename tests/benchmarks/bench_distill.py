"""A distilled B0 against a B0 trained on labels alone: same epochs, same data, 3 seeds, on the local stack.

- **teacher**: the smoke job (B0 at 64 px) trained longer (`--teacher-epochs`), by `compound job run`,
  without label smoothing (`--teacher-label-smoothing`, default 0): a teacher trained with it makes
  every wrong class about equally unlikely, so its softened targets are flat and say little beyond
  its argmax (Müller et al. 2019) — measured here, such a teacher cost the students 12–18 points.
- **students**: B0 at 32 px (`--student-resolution`) for `--epochs` epochs, once per seed on labels
  alone and once distilled from the teacher's final checkpoint (`distill: {teacher: s3://…, alpha,
  temperature}`, by default the seed article's 0.25 and 4): the teacher sees each crop at 64 px, the
  student at 32 px. Same seeds, so both see the same batches.

Prints each run's final validation top-1 (and, distilled, the teacher's top-1 on the crops it scored),
the mean and spread of both groups, and the teacher's. Bar (issue 11): distilled ≥ label-only.

    python tests/benchmarks/bench_distill.py [--epochs 4] [--teacher-epochs 8] [--seeds 0 1 2] [--alpha 0.25]
        [--temperature 4] [--student-resolution 32] [--teacher-label-smoothing 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "jobs" / "examples" / "b0-cpu-smoke.yaml"
COMPOUND = str(Path(sys.executable).with_name("compound"))


def run_job(spec: dict, home: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from bench_sweep import timed

    path = home / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    _, out = timed([COMPOUND, "job", "run", str(path), "--json", "--home", str(home)])
    return json.loads([line for line in out.splitlines() if line.startswith('{"job"')][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.25, help="weight of the label loss (the article: 1:3)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--student-resolution", type=int, default=32)
    parser.add_argument("--teacher-label-smoothing", type=float, default=0.0,
                        help="the teacher's (the smoke job's own is 0.1)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from bench_training import start_stack, write_digits

    from infra.stack import Stack
    from jobs.connect import s3_access

    home = Path(tempfile.mkdtemp(prefix="cdistill", dir="/tmp"))
    stack = Stack(home)
    try:
        settings = start_stack(stack)
        write_digits(s3_access(settings), resolution=64, shard_mb=0.25)
        base = yaml.safe_load(SMOKE.read_text())
        tag = uuid.uuid4().hex[:6]
        teacher_optim = {**base["optim"], "epochs": args.teacher_epochs,
                         "label_smoothing": args.teacher_label_smoothing}
        teacher = run_job({**base, "name": f"teacher-{tag}", "optim": teacher_optim}, home)
        teacher_top1 = teacher["epochs"][-1]["val_top1"]
        print(f"teacher: B0 at 64 px, {args.teacher_epochs} epochs, label smoothing "
              f"{teacher_optim['label_smoothing']}: val top-1 {teacher_top1:.4f}", flush=True)

        results: dict[str, list[float]] = {"label-only": [], "distilled": []}
        for seed in args.seeds:
            for kind, values in results.items():
                spec = {**base, "name": f"{kind}-{seed}-{tag}",
                        "model": {**base["model"], "resolution": args.student_resolution},
                        "optim": {**base["optim"], "epochs": args.epochs, "seed": seed}}
                if kind == "distilled":
                    spec["distill"] = {"teacher": teacher["checkpoint"], "alpha": args.alpha,
                                       "temperature": args.temperature}
                last = run_job(spec, home)["epochs"][-1]
                values.append(last["val_top1"])
                on_crops = (f"  (teacher on its crops in the last epoch: {last['train_teacher_top1']:.4f})"
                            if kind == "distilled" else "")
                print(f"{kind:10} seed {seed}: val top-1 {last['val_top1']:.4f}{on_crops}", flush=True)

        print(f"\nB0 at {args.student_resolution} px, {args.epochs} epochs, seeds {args.seeds}, alpha {args.alpha}, "
              f"temperature {args.temperature} (teacher: {teacher_top1:.4f})")
        for kind, values in results.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{kind:12} mean val top-1 {statistics.mean(values):.4f}  ± {spread:.4f} (stdev)  "
                  f"min {min(values):.4f}  max {max(values):.4f}")
        gain = statistics.mean(results["distilled"]) - statistics.mean(results["label-only"])
        print(f"distilled − label-only: {gain * 100:+.2f} points (bar: ≥ 0)")
    finally:
        stack.down()
        shutil.rmtree(stack.ray_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
