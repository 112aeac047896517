"""The sampler interface shared by the engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from idempo.evaluation.branching import TokenStats
from idempo.models import Generation, Policy

# A chat (list of {"role", "content"} messages, rendered with the model's chat template) or raw text
# for a base model to continue.
Prompt = list[dict[str, str]] | str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int  # draws are reproducible for a given seed, batch size and device
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finished: bool  # ended with an end-of-turn token rather than at max_new_tokens
    token_ids: tuple[int, ...] = ()  # the answer's tokens, end-of-turn excluded


class Sampler(Protocol):
    @classmethod
    def check(cls, config) -> None:
        """Raise ConfigError if this engine cannot run the experiment config here (before any model loads)."""
        ...

    @classmethod
    def from_config(cls, config, tokenizer, policy: Policy) -> Sampler:
        """The engine for an experiment config; `policy` holds the generations' weights in this process."""
        ...

    def sleep(self) -> None:
        """Give back the accelerator memory the engine holds while a generation trains; the next call wakes it."""
        ...

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        """One completion per prompt, in order, from the weights of `generation`."""
        ...

    def generate_ids(
        self, prompt_ids: list[list[int]], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        """`generate` for prompts already tokenized (benchmarks send token ids)."""
        ...

    def token_statistics(
        self,
        prompts: list[Prompt],
        completions: list[Completion],
        generation: Generation,
        temperature: float,
        top_p: float,
    ) -> list[TokenStats]:
        """Per answer token, the entropy of `generation`'s top-p next-token distribution and the NLL of the
        answer's token (the branching factor's inputs; see idempo.evaluation.branching)."""
        ...


class PromptEncoding:
    """`generate` for engines that sample from token ids: each prompt encoded as the trainer encodes it."""

    tokenizer: object

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        return self.generate_ids([encode_prompt(self.tokenizer, p) for p in prompts], params, generation, progress)


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
