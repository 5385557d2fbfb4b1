"""Pipeline specs: the example validates whole; every kind of mistake is refused with its path, before
anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compound.cli import cli
from jobs.spec import SpecError, read_job_data, read_sweep_data
from pipelines.graph import downstream, substitute, topological_order
from pipelines.spec import load_pipeline_spec, load_pipeline_spec_text, with_data

EXAMPLES = Path(__file__).parents[2] / "pipelines" / "examples"
TINY = EXAMPLES / "digits-tiny.yaml"


def _problems(tmp_path: Path, change) -> list[str]:
    """The problems of the tiny pipeline (its files read in) after `change` edits its mapping."""
    data = yaml.safe_load(TINY.read_text())
    for stage in data["stages"].values():
        for key, read in (("job", read_job_data), ("sweep", read_sweep_data)):
            if isinstance(stage["with"].get(key), str):
                stage["with"][key] = read(EXAMPLES / stage["with"][key])
    change(data)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as raised:
        load_pipeline_spec(path)
    return list(raised.value.problems)


def test_the_tiny_example_validates_with_its_files_read_in_and_in_order() -> None:
    spec = load_pipeline_spec(TINY)
    assert spec.order() == ["teacher", "student", "int8", "evaluate", "register", "promote"]
    assert spec.stages["teacher"].with_["sweep"]["job"]["model"]["arch"] == "efficientnet_b0"  # read in
    assert spec.downstream("int8") == {"int8", "evaluate", "register", "promote"}
    again = load_pipeline_spec_text(CliRunner().invoke(cli, ["pipeline", "validate", str(TINY)]).output, "printed")
    assert again == spec  # what validate prints is the whole spec: what submit stores


def test_data_can_be_replaced_and_is_checked() -> None:
    spec = with_data(load_pipeline_spec(TINY), "s3://shards/new/manifest.json", "test")
    assert spec.data == "s3://shards/new/manifest.json"
    with pytest.raises(SpecError, match="data"):
        with_data(spec, "/local/manifest.json", "test")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["stages"]["int8"].update(uses="quantise"),
     "stages.int8.uses: unknown stage kind 'quantise'; one of train, sweep, distill"),
    (lambda d: d["stages"]["int8"]["with"].update(model="${stages.pupil.outputs.checkpoint}"),
     "stages.int8.with.model: ${stages.pupil.outputs.checkpoint}: no stage 'pupil'"),
    (lambda d: d["stages"]["int8"]["with"].update(model="${stages.student.outputs.weights}"),
     ("stages.int8.with.model: ${stages.student.outputs.weights}: a distill stage has no output 'weights'; "
     "its outputs: job, checkpoint, run_id, val_top1")),
    (lambda d: d["stages"]["int8"]["with"].update(model="${student.checkpoint}"),
     "stages.int8.with.model: ${student.checkpoint} is not a reference"),
    (lambda d: d["stages"]["int8"]["with"].update(model="${stages.int8.outputs.fp32_onnx}"),
     "a stage cannot take its own output"),
    (lambda d: d["stages"]["teacher"]["with"].update(data="${stages.promote.outputs.action}"),
     "stages: a cycle of references: evaluate → int8 → student → teacher → promote → register → evaluate"),
    (lambda d: d["stages"]["int8"]["with"].pop("model"), "stages.int8.with.model: required, but missing"),
    (lambda d: d["stages"]["int8"]["with"].update(max_dorp=2), "stages.int8.with.max_dorp: unknown field"),
    (lambda d: d["stages"]["int8"]["with"].update(max_drop=-1), "stages.int8.with.max_drop: Input should be greater"),
    (lambda d: d["stages"]["promote"]["with"].update(version="${stages.int8.outputs.recipe}"),
     "stages.promote.with.version: Input should be a valid integer"),
    (lambda d: d["stages"]["student"]["with"]["job"]["optim"].update(epochs=0),
     "stages.student.with.job.optim.epochs: Input should be greater than or equal to 1"),
    (lambda d: d["stages"]["teacher"]["with"]["sweep"].update(trials=0),
     "stages.teacher.with.sweep.trials: Input should be greater than or equal to 1"),
    (lambda d: d["stages"]["register"]["with"].update(quantized="${stages.int8.outputs.folder}"),
     ("stages.register.with.quantized: takes all of a quantize stage's outputs, not one of them: write "
     "${stages.NAME.outputs}, NAME the quantize stage (got 's3://bucket/pipelines/p/run/int8')")),
    (lambda d: d["stages"]["register"]["with"].update(quantized="${stages.student.outputs}"),
     "stages.register.with.quantized.fp32_onnx: required, but missing"),
    (lambda d: d["stages"]["register"]["with"]["gate"].update(tolerance="some"),
     "stages.register.with.gate.tolerance: Input should be a valid number"),
    (lambda d: d["stages"].update({"Bad_Stage": d["stages"].pop("promote")}), "stage names are lowercase"),
    (lambda d: d.update(name="Digits Tiny"), ("name: should be lowercase letters, digits and '-', starting with a "
                                             "lowercase letter or a digit, at most 24 characters (got 'Digits Tiny')")),
    (lambda d: d.update(data="s3://shards/digits/"),
     "data: should be an S3 URL, s3://bucket/path, ending in .json (got 's3://shards/digits/')"),
    (lambda d: d.update(stages={}), "stages: Dictionary should have at least 1 item"),
    (lambda d: d.update(schedule="nightly"), "schedule: unknown field; allowed here: data, experiment, max_runtime, name, stages"),
])
def test_a_wrong_pipeline_is_refused_with_the_path_of_each_problem(tmp_path: Path, change, expected: str) -> None:
    problems = _problems(tmp_path, change)
    assert any(expected in problem for problem in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    def two_wrong(data: dict) -> None:
        data["stages"]["int8"]["with"]["max_drop"] = "lots"
        data["stages"]["evaluate"]["with"]["modelz"] = {}

    problems = _problems(tmp_path, two_wrong)
    assert any(p.startswith("stages.int8.with.max_drop") for p in problems)
    assert any(p.startswith("stages.evaluate.with.modelz: unknown field") for p in problems)


def test_validate_exits_2_naming_the_problem_and_a_missing_file(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["stages"]["student"]["with"]["job"] = "no-such-student.yaml"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["pipeline", "validate", str(path)])
    assert result.exit_code == 2
    assert "no-such-student.yaml" in result.output and "cannot read the file" in result.output


def test_references_are_substituted_keeping_types_and_order_follows_needs() -> None:
    outputs = {"stages.a.outputs.n": 3, "data": "s3://b/m.json"}
    assert substitute({"x": "${stages.a.outputs.n}", "y": ["at ${data}"]}, outputs.__getitem__) == \
        {"x": 3, "y": ["at s3://b/m.json"]}
    needs = {"c": ["b"], "a": [], "b": ["a"], "d": []}
    assert topological_order(needs) == ["a", "b", "c", "d"]
    assert downstream(needs, "b") == {"b", "c"}
    with pytest.raises(ValueError, match="a → b → a"):
        topological_order({"a": ["b"], "b": ["a"]})
