"""Job specs: YAML read strictly, every section validated, errors that name the field, exit code 2."""

import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cluster.data.loader import plan_epoch
from cluster.data.manifest import ShardInfo
from compound.cli import cli
from jobs.spec import MAX_SPEC_BYTES, JobSpec, SpecError, dump_spec, load_job_spec, load_sweep_spec

EXAMPLES = sorted((Path(__file__).parents[2] / "jobs" / "examples").glob("*.yaml"))
SWEEP_EXAMPLES = [path for path in EXAMPLES if path.stem.endswith("-sweep")]
JOB_EXAMPLES = [path for path in EXAMPLES if path not in SWEEP_EXAMPLES]
MINIMAL = {"name": "tiny", "data": {"train": {"manifest": "s3://shards/digits/manifest.json"}}}


def _write(tmp_path: Path, spec: dict | str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


def _problems(tmp_path: Path, spec: dict | str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_job_spec(_write(tmp_path, spec))
    return list(caught.value.problems)


def _with(section: str, **values: object) -> dict:
    return {**MINIMAL, section: {**MINIMAL.get(section, {}), **values}}


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=lambda p: p.name)
def test_every_job_example_is_a_valid_spec(path: Path) -> None:
    spec = load_job_spec(path)
    assert spec.name and spec.data.val is not None and spec.model.resolution


@pytest.mark.parametrize("path", SWEEP_EXAMPLES, ids=lambda p: p.name)
def test_every_sweep_example_is_a_valid_sweep_of_a_job_example(path: Path) -> None:
    sweep = load_sweep_spec(path)
    assert sweep.base_job.name in {load_job_spec(job).name for job in JOB_EXAMPLES} and len(sweep.space) >= 4


def test_defaults_are_resolved_from_the_model() -> None:
    spec = JobSpec.model_validate({**MINIMAL, "model": {"arch": "efficientnet_b3"}})
    assert (spec.model.resolution, spec.model.dropout, spec.model.drop_path_rate) == (300, 0.3, 0.2)
    assert spec.model.bn_momentum == 0.1
    b7 = JobSpec.model_validate({**MINIMAL, "model": {"arch": "efficientnet_b7"}})
    assert (b7.model.resolution, b7.model.bn_momentum) == (600, 0.01)  # TensorFlow's, as the reference
    assert spec.data.val.manifest == spec.data.train.manifest and spec.data.val.split == "val"
    resnet = JobSpec.model_validate({**MINIMAL, "model": {"arch": "resnet50"}})
    assert resnet.model.resolution == 224 and resnet.model.dropout is None


def test_peak_lr_scales_with_the_global_batch() -> None:
    spec = JobSpec.model_validate({**MINIMAL, "optim": {"lr": 0.1, "lr_reference_batch": 256, "grad_accumulation": 2},
                                   "data": {**MINIMAL["data"], "batch_size": 64}, "scaling": {"num_workers": 4}})
    assert spec.global_batch == 512 and spec.peak_lr == pytest.approx(0.2)


def test_an_elastic_job_counts_its_batch_and_its_steps_on_its_most_workers() -> None:
    spec = JobSpec.model_validate({**MINIMAL, "scaling": {"num_workers": {"min": 2, "max": 4}},
                                   "data": {**MINIMAL["data"], "batch_size": 8}})
    assert (spec.scaling.elastic, spec.scaling.min_workers, spec.scaling.max_workers) == (True, 2, 4)
    assert spec.global_batch == 32 and spec.steps_per_epoch(320) == 10
    assert JobSpec.model_validate(yaml.safe_load(dump_spec(spec))) == spec  # what `validate` prints reads back
    fixed = JobSpec.model_validate({**MINIMAL, "scaling": {"num_workers": 3}}).scaling
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers) == (False, 3, 3)


@pytest.mark.parametrize(("samples", "workers", "loader_workers", "batch_size", "accumulation"), [
    (1797, 2, 2, 32, 1), (1437, 3, 1, 16, 4), (100, 1, 0, 7, 3), (64, 2, 2, 64, 2),
])
def test_steps_per_epoch_are_counted_as_the_loader_and_the_loop_count_them(
    samples: int, workers: int, loader_workers: int, batch_size: int, accumulation: int,
) -> None:
    spec = JobSpec.model_validate({**MINIMAL, "data": {**MINIMAL["data"], "batch_size": batch_size,
                                                       "loader_workers": loader_workers},
                                   "scaling": {"num_workers": workers}, "optim": {"grad_accumulation": accumulation}})
    sizes = [samples // 3, samples // 3, samples - 2 * (samples // 3)]
    shards = tuple(ShardInfo(url=f"s3://b/{i}.tar", samples=n, bytes=1, sha256="0" * 64) for i, n in enumerate(sizes))
    readers = max(1, loader_workers)
    plan = plan_epoch(shards, epoch=0, seed=0, num_slots=workers * readers, batch_size=batch_size, shuffle=True)
    assert spec.steps_per_epoch(samples) == math.ceil(plan.batches_per_slot * readers / accumulation)


def test_warmup_steps_longer_than_the_run_are_refused_once_the_data_is_known() -> None:
    long = JobSpec.model_validate(_with("optim", warmup_steps=1_000_000, epochs=3))
    assert long.warmup_problem(1797) == (
        "optim.warmup_steps: 1000000, but the run takes 90 optimiser steps (3 optim.epochs of 30): the learning rate "
        "would never reach its peak; warm up for fewer steps")
    assert JobSpec.model_validate(_with("optim", warmup_steps=89, epochs=3)).warmup_problem(1797) is None
    assert JobSpec.model_validate(_with("optim", warmup_epochs=0.5)).warmup_problem(1797) is None


@pytest.mark.parametrize(("change", "expected"), [
    ({"tracker": {}}, "tracker: unknown field; allowed here: checkpoint, data, distill, failure, max_runtime, model, name, optim"),
    (_with("model", archh="efficientnet_b0"), "model.archh: unknown field; allowed here: activation_checkpointing, arch"),
    (_with("strategy", name="deepspeed", stage=3), "strategy.deepspeed.stage: unknown field; allowed here: config, name, zero_stage"),
    (_with("model", arch="efficientnet_b9"), "model: arch 'efficientnet_b9' is not a model compound trains; choose one of efficientnet_b0"),
    (_with("optim", lr="fast"), "optim.lr: Input should be a valid number, unable to parse string as a number (got 'fast')"),
    (_with("optim", lr=-1), "optim.lr: Input should be greater than 0 (got -1)"),
    (_with("scaling", num_workers=0), "scaling.num_workers: Input should be greater than or equal to 1 (got 0)"),
    (_with("strategy", name="deepspeed", zero_stage=4), "strategy.deepspeed.zero_stage: Input should be 1, 2 or 3 (got 4)"),
    (_with("strategy", name="fsdp"), "strategy: Input tag 'fsdp' found using 'name' does not match any of the expected tags: 'ddp', 'deepspeed'"),
    (_with("precision", dtype="fp16"), "precision.dtype fp16 needs GPUs (scaling.use_gpu: true); on CPU use bf16 or fp32"),
    (_with("model", arch="resnet50", dropout=0.3), "model: dropout apply to EfficientNet variants only, not resnet50; remove them"),
    (_with("model", arch="resnet50", bn_momentum=0.1), "model: bn_momentum apply to EfficientNet variants only"),
    (_with("model", bn_momentum=0), "model.bn_momentum: Input should be greater than 0 (got 0)"),
    (_with("model", freeze_through_stage=7), "model.freeze_through_stage: Input should be less than 7 (got 7)"),
    ({**_with("optim", grad_accumulation=4), "checkpoint": {"every_steps": 10}},
     "checkpoint.every_steps (10) must be a multiple of optim.grad_accumulation (4)"),
    ({**_with("optim", ema_decay=0.999), "strategy": {"name": "deepspeed", "zero_stage": 3}},
     "optim.ema_decay is not supported with ZeRO stage 3"),
    (_with("optim", warmup_steps=100, warmup_epochs=1), "optim: give warmup_epochs or warmup_steps, not both"),
    ({**MINIMAL, "name": "My Job!"}, ("name: should be lowercase letters, digits, '.', '_' and '-', starting with a "
                                     "lowercase letter or a digit, at most 63 characters (got 'My Job!')")),
    ({"name": "tiny"}, "data: required, but missing"),
    ({**MINIMAL, "data": {"train": {"manifest": "/local/manifest.json"}}},
     "data.train.manifest: should be an S3 URL, s3://bucket/path (got '/local/manifest.json')"),
    (_with("data", batch_size=[32]), "data.batch_size: Input should be a valid integer (got [32])"),
    (_with("checkpoint", storage="checkpoints/jobs"),
     "checkpoint.storage: should be an S3 URL, s3://bucket or s3://bucket/prefix (got 'checkpoints/jobs')"),
    ({**MINIMAL, "data": {**MINIMAL["data"], "augment": {"crop_scale": [1.0, 0.35]}}},
     "data.augment.crop_scale: give [min, max] fractions of the image's area, with 0 < min <= max <= 1 (got [1.0, 0.35])"),
    ({**MINIMAL, "data": {**MINIMAL["data"], "augment": {"crop_scale": [0, 1]}}}, "with 0 < min <= max <= 1"),
    (_with("strategy", name="deepspeed", config={"train_batch_size": 64}),
     "config.train_batch_size is set by data.batch_size × scaling.num_workers × optim.grad_accumulation; remove it"),
    (_with("strategy", name="deepspeed", config={"zero_optimization": {"stage": 3}}),
     "config.zero_optimization.stage is set by strategy.zero_stage; remove it from the override"),
    (_with("strategy", name="deepspeed", config={"optimizer": {"type": "Adam"}}), "config.optimizer is set by optim"),
    (_with("strategy", name="deepspeed", config={"bf16": {"enabled": True}}), "config.bf16.enabled is set by precision.dtype"),
    (_with("strategy", name="deepspeed", config={"zero_optimization": {"overlap_com": True}}),
     "config.zero_optimization is not a valid DeepSpeed ZeRO section: overlap_com: Extra inputs are not permitted"),
    (_with("strategy", name="deepspeed", config={"zero_optimization": {"reduce_bucket_size": "big"}}),
     "config.zero_optimization is not a valid DeepSpeed ZeRO section: reduce_bucket_size:"),
])
def test_bad_specs_name_the_field_the_value_and_what_is_allowed(tmp_path: Path, change: dict, expected: str) -> None:
    problems = _problems(tmp_path, change)
    assert any(expected in problem for problem in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(tmp_path, {**_with("optim", lr=0, epochs=0), "extra": 1})
    assert len(problems) == 3


@pytest.mark.parametrize(("text", "expected"), [
    ("name: !!python/object:os.system x\n", "tags (tag:yaml.org,2002:python/object:os.system) are not allowed"),
    ("name: !!str tiny\n", "tags (tag:yaml.org,2002:str) are not allowed"),
    ("a: &x [1, 2]\nb: *x\n", "anchors and aliases (&name, *name) are not allowed"),
    ("name: a\nname: b\n", "line 2: key 'name' appears twice"),
    ("- just\n- a list\n", "this file holds a list"),
    ("", "this file holds an empty file"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_yaml_is_read_strictly(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_alias_bomb_is_refused_without_expanding(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    problems = _problems(tmp_path, "\n".join(lines) + "\n")
    assert "anchors and aliases" in problems[0]


def test_oversized_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    assert "specs are at most" in _problems(tmp_path, "# " + "x" * MAX_SPEC_BYTES + "\n")[0]
    (tmp_path / "job.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_job_spec(tmp_path / "job.yaml")
    with pytest.raises(SpecError, match="cannot read the file"):
        load_job_spec(tmp_path / "missing.yaml")


def test_pretrained_weights_are_found_next_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "weights.pth").write_bytes(b"not checked here")
    spec = load_job_spec(_write(tmp_path, _with("model", pretrained="weights.pth")))
    assert spec.model.pretrained == str(tmp_path / "weights.pth")
    assert "model.pretrained: no weights file at" in _problems(tmp_path, _with("model", pretrained="nope.pth"))[0]


def test_validate_prints_the_resolved_spec_or_exits_2(tmp_path: Path) -> None:
    good = CliRunner().invoke(cli, ["job", "validate", "--offline", str(_write(tmp_path, MINIMAL))])
    assert good.exit_code == 0, good.output
    printed = yaml.safe_load(good.output)
    assert printed["model"]["resolution"] == 224 and printed["optim"]["optimizer"] == "adamw"
    assert JobSpec.model_validate(printed) == load_job_spec(tmp_path / "job.yaml")

    bad = CliRunner().invoke(cli, ["job", "validate", "--offline", str(_write(tmp_path, _with("optim", lr="fast")))])
    assert bad.exit_code == 2
    assert "optim.lr" in bad.output and "'fast'" in bad.output and "Traceback" not in bad.output


def test_run_refuses_a_bad_spec_before_reading_settings_or_starting_anything(tmp_path: Path) -> None:
    spec = _write(tmp_path, _with("precision", dtype="fp16"))
    result = CliRunner().invoke(cli, ["job", "run", str(spec), "--home", str(tmp_path / "no-stack")])
    assert result.exit_code == 2
    assert "fp16 needs GPUs" in result.output
    assert not (tmp_path / "no-stack").exists()
