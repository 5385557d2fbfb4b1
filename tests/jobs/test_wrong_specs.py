"""The corpus of wrong specs: every one is refused by `validate` (`compound job|sweep validate --offline`,
`compound pipeline validate`) with exit code 2 and a message naming the field in words, no traceback, and
nothing started. One line per wrong spec: the change to a valid spec, and what the message must say."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from compound.cli import cli
from jobs.spec import MAX_SPEC_DEPTH, SpecError, load_job_spec, read_job_data, read_sweep_data

MINIMAL = {"name": "tiny", "data": {"train": {"manifest": "s3://shards/digits/manifest.json"}}, "optim": {"epochs": 3}}
PIPELINES = Path(__file__).parents[2] / "pipelines" / "examples"
INF, NAN = float("inf"), float("nan")


def _job(**changes: Any) -> dict[str, Any]:
    """The minimal job with `changes`: a mapping is merged into the section of that name."""
    job = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) and isinstance(job.get(key), dict) else value
    return job


def _deepspeed(**config: Any) -> dict[str, Any]:
    return _job(strategy={"name": "deepspeed", "config": config})


def _sweep(space: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"name": "tiny-sweep", "job": MINIMAL, "space": space, "trials": 2, **changes}


def _validate(tmp_path: Path, group: str, spec: dict[str, Any] | str) -> str:
    """`compound GROUP validate` of the spec: its output, after checking it refused the spec as a user sees it."""
    path = tmp_path / f"{group}.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    offline = ["--offline"] if group in ("job", "sweep") else []
    result = CliRunner().invoke(cli, [group, "validate", *offline, str(path)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    return result.output


JOBS = [
    # a value of the wrong kind where a name belongs, at any depth
    (_job(model={"arch": {"a": 1}}), "model.arch: Input should be a valid string (got {'a': 1})"),
    (_job(model={"arch": ["efficientnet_b0"]}), "model.arch: Input should be a valid string"),
    (_job(model={"arch": None}), "model.arch: Input should be a valid string (got None)"),
    (_job(model=[1]), "model: Input should be a valid dictionary or instance of ModelSpec (got [1])"),
    (_job(data={"train": "s3://shards/digits/manifest.json"}), "data.train: Input should be a valid dictionary"),
    (_job(distill=[1]), "distill: Input should be a valid dictionary or instance of DistillSpec"),
    (_job(tracking={"tags": {"a": {"b": 1}}}), "tracking.tags.a: Input should be a valid string"),
    # YAML's booleans where a string belongs, numbers where text belongs
    ({**MINIMAL, "name": False}, "name: should be text, but YAML reads unquoted no, off and false as false: quote it"),
    ({**MINIMAL, "name": 2024}, "name: should be text, not a number: quote it, e.g. '2024' (got 2024)"),
    # names in words, not a regex
    ({**MINIMAL, "name": "My Job!"}, ("name: should be lowercase letters, digits, '.', '_' and '-', starting with a "
                                     "lowercase letter or a digit, at most 63 characters (got 'My Job!')")),
    ({**MINIMAL, "name": "x" * 64}, "at most 63 characters"),
    # true/false where a number belongs (pydantic alone reads them as 1 and 0)
    (_job(data={"batch_size": True}), "data.batch_size: should be a whole number, not true or false (got True)"),
    (_job(optim={"epochs": True}), "optim.epochs: should be a whole number, not true or false"),
    (_job(optim={"lr": True}), "optim.lr: should be a number, not true or false"),
    (_job(scaling={"num_workers": False}), "scaling.num_workers: should be a whole number, not true or false"),
    (_job(scaling={"num_workers": {"min": 3, "max": 2}}), "scaling.num_workers: min (3) is more than max (2)"),
    (_job(scaling={"num_workers": {"min": 0, "max": 2}}), "scaling.num_workers.min: Input should be greater than"),
    (_job(scaling={"num_workers": {"min": 1}}), "scaling.num_workers.max: required, but missing"),
    (_job(scaling={"num_workers": {"min": 1, "max": 2, "step": 1}}), "scaling.num_workers.step: unknown field"),
    (_job(scaling={"num_workers": "two"}), "scaling.num_workers: Input should be a valid integer"),
    (_job(scaling={"num_workers": {"min": 1, "max": 2}}, strategy={"name": "deepspeed", "zero_stage": 3}),
     "an elastic scaling.num_workers with DeepSpeed needs zero_stage 1 or 2 and optim.optimizer adamw"),
    (_job(scaling={"num_workers": {"min": 1, "max": 2}}, strategy={"name": "deepspeed", "zero_stage": 2},
          optim={"optimizer": "sgd"}), "with DeepSpeed needs zero_stage 1 or 2 and optim.optimizer adamw"),
    (_job(strategy={"name": "deepspeed", "zero_stage": True}), "strategy.zero_stage: should be a whole number"),
    (_job(data={"augment": {"randaugment_magnitude": True}}), "data.augment.randaugment_magnitude: should be a whole"),
    (_job(tracking={"metrics_every_steps": True}), "tracking.metrics_every_steps: should be a whole number"),
    # max_runtime: a positive duration
    (_job(max_runtime="2 weeks"), "max_runtime: '2 weeks' is not a duration: write seconds, or a number with s, m, h"),
    (_job(max_runtime=0), "max_runtime: Input should be greater than 0 (got 0)"),
    (_job(max_runtime=True), "max_runtime: should be a number, not true or false"),
    (_job(max_runtime=INF), "max_runtime: not a finite number (got inf)"),
    # infinities and NaN
    (_job(optim={"warmup_epochs": INF}), "optim.warmup_epochs: not a finite number (got inf)"),
    (_job(optim={"weight_decay": INF}), "optim.weight_decay: not a finite number (got inf)"),
    (_job(optim={"lr": NAN}), "optim.lr: not a finite number (got nan)"),
    (_job(optim={"lr": "nan"}), "optim.lr: not a finite number (got 'nan')"),
    (_job(scaling={"cpus_per_worker": INF}), "scaling.cpus_per_worker: not a finite number (got inf)"),
    (_job(data={"augment": {"mixup_alpha": INF}}), "data.augment.mixup_alpha: not a finite number"),
    (_job(distill={"teacher": "s3://b/t", "temperature": NAN}), "distill.temperature: not a finite number"),
    # warm-up longer than training
    (_job(optim={"warmup_epochs": 50}), ("optim: warmup_epochs (50) is not shorter than epochs (3): the learning "
                                        "rate would never reach its peak")),
    (_job(optim={"warmup_epochs": 3}), "the learning rate would never reach its peak"),
    # DeepSpeed sections the spec owns
    (_deepspeed(bf16="on"), ("config.bf16 must be a mapping of DeepSpeed bf16 options, whose enabled is set by "
                            "precision.dtype (got 'on')")),
    (_deepspeed(fp16=5), "config.fp16 must be a mapping of DeepSpeed fp16 options, whose enabled is set by precision.dtype"),
    (_deepspeed(activation_checkpointing=7), "config.activation_checkpointing is set by model.activation_checkpointing"),
    (_deepspeed(bfloat16={"enabled": True}), "config.bfloat16 is set by precision.dtype"),
    (_deepspeed(data_types="bf16"), "config.data_types must be a mapping of DeepSpeed data_types options"),
    (_deepspeed(zero_optimization=7), "config.zero_optimization must be a mapping of DeepSpeed zero_optimization"),
    (_deepspeed(fp16={"loss_scal": 1}), "config.fp16 is not a valid DeepSpeed fp16 section: loss_scal: Extra inputs"),
    (_deepspeed(bf16={"immediate_grad_update": "soon"}), "config.bf16 is not a valid DeepSpeed bf16 section"),
    (_deepspeed(zero_optimization={1: 2}), "config.zero_optimization: its keys are DeepSpeed option names"),
    # cross-field problems name their fields, not "(top level)"
    (_job(precision={"dtype": "fp16"}), "\n  - precision.dtype fp16 needs GPUs (scaling.use_gpu: true)"),
]


@pytest.mark.parametrize(("spec", "expected"), JOBS)
def test_a_wrong_job_is_refused_by_validate_naming_the_field(tmp_path: Path, spec: dict, expected: str) -> None:
    output = _validate(tmp_path, "job", spec)
    assert expected in output and "(top level)" not in output, output


SWEEPS = [
    (_sweep({"optim.warmup_epochs": {"uniform": [0.0, 5.0]}}),
     ("space: a trial with optim.warmup_epochs=5.0 is not a valid job: optim: warmup_epochs (5) is not shorter than "
     "epochs (3): the learning rate would never reach its peak")),
    (_sweep({"optim.weight_decay": {"uniform": [0.0, INF]}}), "space.optim.weight_decay.uniform[1]: not a finite number"),
    (_sweep({"optim.lr": {"loguniform": [1e-4, NAN]}}), "space.optim.lr.loguniform[1]: not a finite number"),
    (_sweep({"data.batch_size": {"choice": [True, 8]}}),
     "space: a trial with data.batch_size=True is not a valid job: data.batch_size: should be a whole number"),
    (_sweep({"data.batch_size": {"randint": [False, 8]}}), "space.data.batch_size.randint[0]: should be a whole number"),
    (_sweep({"optim.lr": {"choice": [0.1]}}, scheduler={"reduction_factor": INF}),
     "scheduler.reduction_factor: not a finite number"),
    (_sweep({"optim.lr": {"choice": [0.1]}}, trials=True), "trials: should be a whole number, not true or false"),
    (_sweep({"model.arch": {"choice": [{"a": 1}]}}), "model.arch: Input should be a valid string (got {'a': 1})"),
    (_sweep({"distill.alpha": {"choice": [0.5]}}, job={**MINIMAL, "distill": None}),
     "a trial with distill.alpha=0.5 is not a valid job: distill.teacher: required, but missing"),
    (_sweep({"optim.lr": {"choice": [0.1]}}, job={**MINIMAL, "model": {"arch": {"a": 1}}}),
     "job.model.arch: Input should be a valid string"),
    (_sweep({"optim.lr": {"choice": [0.1]}}, job="/"), "job: /: a folder, not a spec file"),
    (_sweep({"optim.lr": {"choice": [0.1]}}, job="/no/such/job.yaml"), "job: /no/such/job.yaml: cannot read the file"),
    (_sweep({"optim.lr": {"choice": [0.1]}}, name="Big Sweep"),
     ("name: should be lowercase letters, digits, '.', '_' and '-', starting with a lowercase letter or a digit, at "
     "most 50 characters (got 'Big Sweep')")),
]


@pytest.mark.parametrize(("spec", "expected"), SWEEPS)
def test_a_wrong_sweep_is_refused_by_validate_naming_the_field(tmp_path: Path, spec: dict, expected: str) -> None:
    output = _validate(tmp_path, "sweep", spec)
    assert expected in output, output


def _set(*path: str | int, to: Any) -> Callable[[dict], None]:
    def change(pipeline: dict) -> None:
        place = pipeline
        for part in path[:-1]:
            place = place[part]
        place[path[-1]] = to
    return change


def _tiny_pipeline() -> dict[str, Any]:
    """The tiny example pipeline, its job and sweep files read in (inline)."""
    data = yaml.safe_load((PIPELINES / "digits-tiny.yaml").read_text())
    for stage in data["stages"].values():
        for key, read in (("job", read_job_data), ("sweep", read_sweep_data)):
            if isinstance(stage["with"].get(key), str):
                stage["with"][key] = read(PIPELINES / stage["with"][key])
    return data


STUDENT_JOB = ("stages", "student", "with", "job")
PIPELINE_CASES = [
    (_set("stages", "int8", "with", "model", to="${stages.student.outputs.checkpoint"),
     "stages.int8.with.model: '${stages.student.outputs.checkpoint' holds a reference written wrongly"),
    (_set("stages", "int8", "with", "model", to="$stages.student.outputs.checkpoint"),
     "stages.int8.with.model: '$stages.student.outputs.checkpoint' holds a reference written wrongly"),
    (_set("stages", "evaluate", "with", "data", to="at $data"), "stages.evaluate.with.data: 'at $data' holds a reference"),
    (_set("stages", "int8", "with", "model", to="${ }"), "stages.int8.with.model: ${} is not a reference"),
    (_set(*STUDENT_JOB, "optim", "warmup_epochs", to=9),
     "stages.student.with.job.optim: warmup_epochs (9) is not shorter than epochs"),
    (_set(*STUDENT_JOB, "data", "batch_size", to=True), "stages.student.with.job.data.batch_size: should be a whole"),
    (_set(*STUDENT_JOB, "model", "arch", to={"a": 1}), "stages.student.with.job.model.arch: Input should be a valid string"),
    (_set(*STUDENT_JOB, "distill", to=[1]), "stages.student.with.job.distill: Input should be a valid dictionary"),
    (_set(*STUDENT_JOB, "tracking", to="mine"), "stages.student.with.job.tracking: Input should be a valid dictionary"),
    (_set("stages", "teacher", "with", "sweep", "tracking", to=[1]),
     "stages.teacher.with.sweep.tracking: Input should be a valid dictionary"),
    (_set("stages", "int8", "with", "max_drop", to=INF), "stages.int8.with.max_drop: not a finite number"),
    (_set("stages", "int8", "with", "calibration_batches", to=True), "stages.int8.with.calibration_batches: should be"),
    (_set(*STUDENT_JOB, to="/no/such/student.yaml"), "stages.student.with.job: /no/such/student.yaml: cannot read the file"),
    (_set("stages", "teacher", "with", "sweep", to="/"), "stages.teacher.with.sweep: /: a folder, not a spec file"),
    (_set("name", to="Digits Tiny"), ("name: should be lowercase letters, digits and '-', starting with a lowercase "
                                     "letter or a digit, at most 24 characters")),
    (_set("name", to=True), "name: should be text, but YAML reads unquoted yes, on and true as true: quote it"),
    (_set("data", to="s3://shards/digits/"), "data: should be an S3 URL, s3://bucket/path, ending in .json"),
    (_set("stages", "promote", "uses", to={"a": 1}), "stages.promote.uses: Input should be a valid string"),
]


@pytest.mark.parametrize(("change", "expected"), PIPELINE_CASES)
def test_a_wrong_pipeline_is_refused_by_validate_with_the_path(tmp_path: Path, change, expected: str) -> None:
    pipeline = _tiny_pipeline()
    change(pipeline)
    output = _validate(tmp_path, "pipeline", pipeline)
    assert expected in output, output


NESTED = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize(("group", "text", "expected"), [
    ("job", f"name: {NESTED}\n", f"line 1: nested more than {MAX_SPEC_DEPTH} levels deep"),
    ("sweep", f"name: s\njob: {{name: {NESTED}}}\n", "nested more than"),
    ("pipeline", f"name: p\nstages: {{a: {{uses: train, with: {{job: {NESTED}}}}}}}\n", "nested more than"),
    ("job", "name: x\nmodel: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "nested more than"),
    ("job", "? [a, b]\n: 1\n", "line 1: a key is a name, not a list or mapping"),
])
def test_yaml_no_spec_needs_is_refused_by_validate(tmp_path: Path, group: str, text: str, expected: str) -> None:
    assert expected in _validate(tmp_path, group, text)


def test_a_folder_is_no_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="a folder, not a spec file"):
        load_job_spec(tmp_path)
