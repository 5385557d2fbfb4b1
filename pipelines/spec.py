"""YAML → a validated, frozen pipeline: named stages, each a stage kind and its inputs, wired by outputs.

    name: digits-b0
    data: s3://shards/digits/manifest.json      # ${data}; a new-data trigger replaces it
    stages:
      teacher: {uses: train, with: {job: teacher.yaml, data: "${data}"}}
      student: {uses: distill, with: {job: student.yaml, teacher: "${stages.teacher.outputs.checkpoint}"}}

A `job:` or `sweep:` input that is a path is read in, relative to the pipeline file, so the spec is
whole on its own (as `submit` stores it). Validation checks every stage's inputs against its kind's
typed inputs (references stand in as example values of their outputs), every reference, and the graph
(no cycles), and reports every problem with its path; nothing runs unless all is well.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.spec import (
    MAX_RUNTIME,
    Duration,
    SpecError,
    parse_spec,
    parse_yaml,
    read_job_data,
    read_sweep_data,
    read_yaml,
)
from pipelines.graph import DATA_REFERENCE, broken_references, downstream, references, substitute, topological_order

# A stage's job is <pipeline>-<stage>-<6 hex>: within a sweep name's 50 characters.
PIPELINE_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,23}$"
STAGE_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,15}$"
FILE_INPUTS = {"job": read_job_data, "sweep": read_sweep_data}  # inputs that may name a spec file


class StageSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    uses: str = Field(description="the stage's kind: train, sweep, distill, quantize, evaluate, register, promote")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the stage's inputs")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=PIPELINE_NAME_PATTERN, description="names the pipeline's runs, jobs and schedules")
    data: str = Field(pattern=r"^s3://[^/]+/.+\.json$", description="the dataset manifest: ${data} in the stages")
    experiment: str | None = Field(default=None, min_length=1, description="MLflow experiment; default: the name")
    stages: dict[str, StageSpec] = Field(min_length=1, description="name → stage, in the order written")
    max_runtime: Duration | None = MAX_RUNTIME

    @model_validator(mode="after")
    def _stage_names(self) -> PipelineSpec:
        bad = [name for name in self.stages if not re.match(STAGE_NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"stage names are lowercase letters, digits and -, at most 16, starting with a letter; "
                             f"got {', '.join(map(repr, bad))}")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    def needs(self) -> dict[str, list[str]]:
        """Each stage → the stages whose outputs it takes, in the order it names them (a stable order: what
        is reported of a cycle is the same every time)."""
        return {name: list(dict.fromkeys(ref.stage for ref in references(stage.with_) if ref.stage in self.stages))
                for name, stage in self.stages.items()}

    def order(self) -> list[str]:
        return topological_order(self.needs())

    def downstream(self, stage: str) -> set[str]:
        return downstream(self.needs(), stage)


def load_pipeline_spec(path: Path) -> PipelineSpec:
    """A pipeline file → a checked `PipelineSpec` with its job and sweep files read in."""
    data = read_yaml(path)
    stages = data.get("stages")
    if isinstance(stages, dict):
        problems: list[str] = []
        data = {**data, "stages": {name: _read_files(stage, path.parent, f"stages.{name}", problems)
                                   for name, stage in stages.items()}}
        if problems:
            raise SpecError(str(path), problems)
    return check_pipeline(parse_spec(PipelineSpec, data, str(path)), str(path))


def load_pipeline_spec_text(text: str, source: str) -> PipelineSpec:
    """A pipeline from YAML text (as `submit` stores it: whole)."""
    return check_pipeline(parse_spec(PipelineSpec, parse_yaml(text, source), source), source)


def with_data(spec: PipelineSpec, data: str | None, source: str) -> PipelineSpec:
    """The pipeline on another dataset manifest (a new-data trigger's, or `--data`)."""
    if data is None:
        return spec
    changed = {**spec.model_dump(mode="json", by_alias=True), "data": data}
    return check_pipeline(parse_spec(PipelineSpec, changed, f"{source} with --data"), source)


def _read_files(stage: Any, folder: Path, where: str, problems: list[str]) -> Any:
    """The stage with its `job:` or `sweep:` file read in (relative to `folder`); what cannot be read goes
    to `problems`, under the input that names the file."""
    inputs = stage.get("with") if isinstance(stage, dict) else None
    if not isinstance(inputs, dict):
        return stage
    read = {}
    for key, reader in FILE_INPUTS.items():
        if isinstance(inputs.get(key), str) and "${" not in inputs[key]:
            try:
                read[key] = reader((folder / inputs[key]).expanduser())
            except SpecError as error:
                problems += [f"{where}.with.{key}: {error.source}: {problem}" for problem in error.problems]
    return {**stage, "with": {**inputs, **read}} if read else stage


def check_from(spec: PipelineSpec, stage: str | None) -> None:
    """Refuse a `--from` that names no stage of the pipeline."""
    if stage is not None and stage not in spec.stages:
        raise SpecError("--from", [f"no stage {stage!r}; stages: {', '.join(spec.stages)}"])


def check_pipeline(spec: PipelineSpec, source: str) -> PipelineSpec:
    """Refuse unknown stage kinds, references to no stage or output, cycles, and inputs a stage does not
    take (missing, unknown, of the wrong kind): every problem, each with its path."""
    from pipelines.stages import STAGES

    problems: list[str] = []
    for name, stage in spec.stages.items():
        if stage.uses not in STAGES:
            problems.append(f"stages.{name}.uses: unknown stage kind {stage.uses!r}; one of {', '.join(STAGES)}")
        for ref in references(stage.with_):
            problem = _reference_problem(spec, name, ref)
            if problem:
                problems.append(f"stages.{name}.{ref.path}: {problem}")
        for path, text in broken_references(stage.with_):
            problems.append(f"stages.{name}.{path}: {text!r} holds a reference written wrongly; write ${{data}} or "
                            "${stages.NAME.outputs.FIELD}, braces closed")
    if problems:
        raise SpecError(source, problems)
    try:
        spec.order()
    except ValueError as cycle:
        raise SpecError(source, [f"stages: a cycle of references: {cycle}"]) from None
    for name, stage in spec.stages.items():
        try:
            stage_inputs(spec, name, lambda text: _example(spec, text))
        except SpecError as error:  # a job's or sweep's problems come as lines of one problem
            lines = [line for problem in error.problems for line in problem.splitlines()]
            problems += [f"stages.{name}.with.{line}" for line in lines]
    if problems:
        raise SpecError(source, problems)
    return spec


def stage_inputs(spec: PipelineSpec, name: str, lookup) -> BaseModel:
    """A stage's typed inputs, each reference replaced by `lookup(text inside ${…})`."""
    from pipelines.stages import STAGES

    stage = spec.stages[name]
    return parse_spec(STAGES[stage.uses].Inputs, substitute(stage.with_, lookup), "inputs")


def _reference_problem(spec: PipelineSpec, name: str, ref) -> str | None:
    from pipelines.stages import STAGES

    if ref.text == DATA_REFERENCE:
        return None
    if ref.stage is None:
        return f"${{{ref.text}}} is not a reference; write ${{data}} or ${{stages.NAME.outputs.FIELD}}"
    if ref.stage == name:
        return f"${{{ref.text}}}: a stage cannot take its own output"
    target = spec.stages.get(ref.stage)
    if target is None:
        return f"${{{ref.text}}}: no stage {ref.stage!r}; stages: {', '.join(spec.stages)}"
    outputs = STAGES[target.uses].Outputs.model_fields if target.uses in STAGES else None
    if outputs is not None and ref.output is not None and ref.output not in outputs:
        return f"${{{ref.text}}}: a {target.uses} stage has no output {ref.output!r}; its outputs: {', '.join(outputs)}"
    return None


def _example(spec: PipelineSpec, text: str) -> Any:
    """What a reference stands for while the pipeline is checked: the data, or an example of the output."""
    from pipelines.graph import STAGE_REFERENCE
    from pipelines.stages import STAGES

    if text == DATA_REFERENCE:
        return spec.data
    stage, output = STAGE_REFERENCE.match(text).groups()
    fields = STAGES[spec.stages[stage].uses].Outputs.model_fields
    examples = {name: info.examples[0] if info.examples else None for name, info in fields.items()}
    return examples if output is None else examples[output]
