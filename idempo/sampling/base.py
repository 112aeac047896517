"""The sampler interface shared by the engines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from idempo.models import Generation

# A chat (list of {"role", "content"} messages, rendered with the model's chat template) or raw text
# for a base model to continue.
Prompt = list[dict[str, str]] | str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int  # draws are reproducible for a given seed, batch size and device


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finished: bool  # ended with an end-of-turn token rather than at max_new_tokens


class Sampler(Protocol):
    def generate(
        self, prompts: list[Prompt], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        """One completion per prompt, in order, from the weights of `generation`."""
        ...
