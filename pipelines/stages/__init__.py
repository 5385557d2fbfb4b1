"""The stages a pipeline wires together: one module per kind, each a typed `run(inputs, context) -> outputs`.

A stage module holds `Inputs` (what its `with:` section may say, validated as a spec is), `Outputs`
(what later stages may reference as `${stages.NAME.outputs.FIELD}`) and `run`. The runner only wires
them: it substitutes references, calls `run`, and records the outputs.
"""

from __future__ import annotations

import types

from pipelines.stages import distill, evaluate, promote, quantize, register, sweep, train

STAGES: dict[str, types.ModuleType] = {
    "train": train, "sweep": sweep, "distill": distill, "quantize": quantize, "evaluate": evaluate,
    "register": register, "promote": promote,
}
