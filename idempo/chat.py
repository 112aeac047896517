"""How prompts become token ids, in one place for the samplers, the trainer and the judges: a prompt the
sampler sends and the same prompt in a training example are the same tokens."""

from __future__ import annotations

# A chat (list of {"role", "content"} messages, rendered with the model's chat template) or raw text
# for a base model to continue.
Prompt = list[dict[str, str]] | str


def render(tokenizer, prompt: Prompt) -> str:
    """Chat prompts through the model's chat template (ready for the answer); raw text as it is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: a chat as its template renders it (specials included), raw text with the
    tokenizer's own specials (a base model's BOS), as documents are encoded for training."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """End-of-turn tokens: the model's generation config (Qwen lists two) and the tokenizer's eos."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids + [tokenizer.eos_token_id] if i is not None]
    return list(dict.fromkeys(ids))
