"""The sampler interface shared by the engines: sample, and give back accelerator memory while a
generation trains. Nothing else: the branching factor reads the policy itself (idempo.evaluation.branching)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from idempo.chat import Prompt, encode_prompt
from idempo.config import SamplingParams
from idempo.models import Generation, Policy

if TYPE_CHECKING:
    from idempo.config import ExperimentConfig


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finished: bool  # ended with an end-of-turn token rather than at max_new_tokens
    token_ids: tuple[int, ...] = ()  # the answer's tokens, end-of-turn excluded


class Sampler(Protocol):
    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Raise ConfigError if this engine cannot run the experiment here (before any model loads)."""
        ...

    @classmethod
    def from_config(cls, config: ExperimentConfig, tokenizer, policy: Policy) -> Sampler:
        """The engine for an experiment; `policy` holds the generations' weights in this process."""
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


class PromptEncoding:
    """`generate` for engines that sample from token ids: each prompt encoded as the trainer encodes it."""

    tokenizer: object

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        return self.generate_ids([encode_prompt(self.tokenizer, p) for p in prompts], params, generation, progress)
