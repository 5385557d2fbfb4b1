"""The demo's distilled B0 student against the same B0 trained on labels alone: 3 seeds, on the local stack.

- **teacher**: the demo's teacher (`pipelines/examples/b7-teacher.yaml`: EfficientNet-B7 from scratch at 32 px,
  no label smoothing), trained once by `compound job run`.
- **students**: the demo's student (`pipelines/examples/b0-student.yaml`: B0 at 32 px, hard:soft 1:3 at
  temperature 4), once per seed distilled from the teacher's final checkpoint and once on labels alone (the
  same spec without its `distill` section). Same seeds, so both see the same batches.

Prints each run's final validation top-1 (and, distilled, its agreement with the teacher's top-1 on the
validation split), the mean and spread of both groups, and the teacher's. Bars (issue 27): distilled ≥
label-only, and distilled ≥ 90 %.

    python tests/benchmarks/bench_distill.py [--seeds 0 1 2] [--teacher SPEC] [--student SPEC]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "pipelines" / "examples" / "b7-teacher.yaml"
STUDENT = REPO / "pipelines" / "examples" / "b0-student.yaml"
COMPOUND = str(Path(sys.executable).with_name("compound"))
STUDENT_FLOOR = 0.90


def run_job(spec: dict, home: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from bench_sweep import timed

    path = home / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    _, out = timed([COMPOUND, "job", "run", str(path), "--json", "--home", str(home)])
    return json.loads([line for line in out.splitlines() if line.startswith('{"job"')][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="the teacher's job spec")
    parser.add_argument("--student", type=Path, default=STUDENT, help="the student's job spec (with a distill section)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests" / "benchmarks"))
    from local_stack import local_stack, write_digits

    from jobs.s3 import s3_access

    with local_stack("cdistill") as (stack, settings):
        home = stack.home
        write_digits(s3_access(settings), resolution=64, shard_mb=0.25)
        tag = uuid.uuid4().hex[:6]
        teacher_spec = yaml.safe_load(args.teacher.read_text())
        teacher = run_job({**teacher_spec, "name": f"teacher-{tag}"}, home)
        teacher_top1 = teacher["epochs"][-1]["val_top1"]
        print(f"teacher: {args.teacher.name}: val top-1 {teacher_top1:.4f}", flush=True)

        student = yaml.safe_load(args.student.read_text())
        distill = {**student.pop("distill"), "teacher": teacher["checkpoint"]}
        results: dict[str, list[float]] = {"label-only": [], "distilled": []}
        for seed in args.seeds:
            for kind, values in results.items():
                spec = {**student, "name": f"{kind}-{seed}-{tag}", "optim": {**student["optim"], "seed": seed},
                        **({"distill": distill} if kind == "distilled" else {})}
                last = run_job(spec, home)["epochs"][-1]
                values.append(last["val_top1"])
                agreement = (f"  (agrees with the teacher on {last['val_teacher_agreement']:.4f} of validation)"
                             if kind == "distilled" else "")
                print(f"{kind:10} seed {seed}: val top-1 {last['val_top1']:.4f}{agreement}", flush=True)

        print(f"\n{args.student.name}, seeds {args.seeds}, alpha {distill['alpha']}, temperature "
              f"{distill['temperature']} (teacher: {teacher_top1:.4f})")
        for kind, values in results.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{kind:12} mean val top-1 {statistics.mean(values):.4f}  ± {spread:.4f} (stdev)  "
                  f"min {min(values):.4f}  max {max(values):.4f}")
        distilled, label_only = statistics.mean(results["distilled"]), statistics.mean(results["label-only"])
        print(f"distilled − label-only: {(distilled - label_only) * 100:+.2f} points (bar: ≥ 0: "
              f"{'met' if distilled >= label_only else 'MISSED'}); distilled {distilled:.4f} (bar: ≥ "
              f"{STUDENT_FLOOR}: {'met' if distilled >= STUDENT_FLOOR else 'MISSED'})")



if __name__ == "__main__":
    main()
