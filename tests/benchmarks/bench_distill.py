"""The demo's distilled B0 student against the same B0 trained on labels alone: 3 seeds, on the local stack.

- **teacher**: the demo's teacher (`pipelines/examples/b7-teacher.yaml`: EfficientNet-B7 from scratch at 32 px,
  no label smoothing), trained once by `compound job run`.
- **students**: the demo's student (`pipelines/examples/b0-student.yaml`: B0 at 32 px, distilled as its
  `distill` section says), once per seed distilled from the teacher's final checkpoint and once on labels alone (the
  same spec without its `distill` section).

Each seed is a round: both students train with `optim.seed` set to it, which seeds the loader (shard and
sample order, and every crop: a batch's augmentation is seeded by the seed and the batch's place) and the
initial weights. The distilled student's loader crops at the larger of the teacher's and the student's
resolution; at equal resolutions (the demo's: 32 px) both students see the same crops, otherwise the
printout says they do not. Both runs log the samples of every step (`data.sample_log`) and the benchmark
checks that both students trained on the same samples in the same steps. Not held equal: dropout and
drop-path draws, as the distilled job builds its teacher from the workers' random generator after the
student. Which student trains first alternates from seed to seed.

Prints each run's final validation top-1 (and, distilled, its agreement with the teacher's top-1 on the
validation split), both groups' mean ± sd and range, and the teacher's. Bars (issue 27): distilled ≥
label-only (the per-seed differences' mean, with their sd and range), and distilled ≥ 90 %.

    python tests/benchmarks/bench_distill.py [--seeds 0 1 2] [--teacher SPEC] [--student SPEC]
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import yaml
from local_stack import local_stack, run_job, write_digits
from rounds import Bar, bar_line, round_order, spread

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "pipelines" / "examples" / "b7-teacher.yaml"
STUDENT = REPO / "pipelines" / "examples" / "b0-student.yaml"
KINDS = ("label-only", "distilled")
GAIN_BAR = Bar(">=", 0.0)  # distilled − label-only, top-1 points
STUDENT_BAR = Bar(">=", 0.90)  # the distilled student's top-1


def samples_by_step(directory: Path) -> dict[tuple[int, int, int], list[str]]:
    """(epoch, step, rank) → the keys trained on, from a job's `data.sample_log` folder (a step logged
    again after a restart counts as its last logging)."""
    steps = {}
    for path in directory.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["epoch"], entry["step"], entry["rank"]] = entry["keys"]
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one round each")
    parser.add_argument("--teacher", type=Path, default=TEACHER, help="the teacher's job spec")
    parser.add_argument("--student", type=Path, default=STUDENT, help="the student's job spec (with a distill section)")
    args = parser.parse_args()

    from cluster.train.config import ModelSpec
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
        # The variants' own resolutions where the specs leave them out.
        teacher_px, student_px = (ModelSpec.model_validate(s["model"]).resolution for s in (teacher_spec, student))
        crops = (f"the same crops ({student_px} px)" if teacher_px <= student_px else
                 f"NOT the same crops: the distilled student's are cut at the teacher's {teacher_px} px and resized "
                 f"to {student_px}")
        print(f"held equal per seed: optim.seed (shard and sample order, augmentation, initial weights); {crops}; "
              "not held equal: dropout and drop-path draws (the distilled job builds its teacher from the same "
              "random generator)", flush=True)

        top1: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for round_index, seed in enumerate(args.seeds):
            logs = {}
            for kind in round_order(KINDS, round_index):
                name = f"{kind}-{seed}-{tag}"
                logs[kind] = home / "samples" / name
                spec = {**student, "name": name, "optim": {**student["optim"], "seed": seed},
                        "data": {**student["data"], "sample_log": str(logs[kind])},
                        **({"distill": distill} if kind == "distilled" else {})}
                last = run_job(spec, home)["epochs"][-1]
                top1[kind].append(last["val_top1"])
                agreement = (f"  (agrees with the teacher on {last['val_teacher_agreement']:.4f} of validation)"
                             if kind == "distilled" else "")
                print(f"{kind:10} seed {seed}: val top-1 {last['val_top1']:.4f}{agreement}", flush=True)
            steps = {kind: samples_by_step(folder) for kind, folder in logs.items()}
            same = steps["label-only"] == steps["distilled"]
            print(f"seed {seed}: both students trained on {'the same' if same else 'DIFFERENT'} samples at every "
                  f"step ({len(steps['distilled'])} steps, counted per rank)", flush=True)

        print(f"\n{args.student.name}, seeds {args.seeds}, alpha {distill['alpha']}, temperature "
              f"{distill['temperature']} (teacher: {teacher_top1:.4f})")
        for kind in KINDS:
            print(f"{kind + ' val top-1, mean ± sd [range]':44}{spread(top1[kind], center='mean', fmt='.4f'):>24}")
        gains = [(d - o) * 100 for d, o in zip(top1["distilled"], top1["label-only"], strict=True)]
        print(bar_line("distilled − label-only, points, per seed", gains, GAIN_BAR, center="mean", rounds="seeds"))
        print(bar_line("distilled val top-1", top1["distilled"], STUDENT_BAR, center="mean", fmt=".4f",
                       rounds="seeds"))


if __name__ == "__main__":
    main()
