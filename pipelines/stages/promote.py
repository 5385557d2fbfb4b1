"""Promote a registered version to `champion` if the gate holds (`pipelines.registry.promote`).

A rejection is an outcome, not a failure: the pipeline finishes, the decision and its reasons are
recorded on the version and in the stage's outputs.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.registry import Gate
from pipelines.stages.base import StageContext, StageInputs, StageOutputs
from pipelines.stages.register import MODEL_NAME_PATTERN


class Inputs(StageInputs):
    model_name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1)
    gate: Gate | None = Field(default=None, description="default: the gate recorded on the version at registration")


class Outputs(StageOutputs):
    action: str = Field(description="promoted | rejected | unchanged", examples=["promoted"])
    champion: int | None = Field(description="the champion after the decision", examples=[1])
    reasons: list[str] = Field(examples=[["ok: int8 drop 0.20 ≤ 1 points"]])


def run(inputs: Inputs, context: StageContext) -> Outputs:
    from pipelines.registry import promote

    decision = promote(context.settings, name=inputs.model_name, version=inputs.version, gate=inputs.gate)
    return Outputs(action=decision.action, champion=decision.champion, reasons=decision.reasons)
