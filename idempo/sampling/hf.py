"""The `hf` sampler: batched transformers `generate` on the trial's own policy module.

It shares the policy with the trainer, so sampling generation j-1 right after training it costs no
load at all; other generations are swapped in as adapter weights. With `sampling.weights: merged` a LoRA
generation is sampled from M_init's weights with its adapter folded in for the call (a plain model's
speed); `adapter` computes the adapter beside them. Prompts are left-padded and sorted
by length within the call so that batches carry little padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from idempo.chat import stop_token_ids
from idempo.config import SamplingParams
from idempo.models import Generation, Policy
from idempo.sampling.base import Completion, PromptEncoding

if TYPE_CHECKING:
    from idempo.config import ExperimentConfig


class HFSampler(PromptEncoding):
    def __init__(self, policy: Policy, tokenizer, batch_size: int, weights: str = "merged"):
        self.policy = policy
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.weights = weights

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Runs wherever the policy does."""

    @classmethod
    def from_config(cls, config: ExperimentConfig, tokenizer, policy: Policy) -> HFSampler:
        return cls(policy, tokenizer, config.sampling.batch_size, config.sampling.weights)

    def sleep(self) -> None:
        """The policy's weights are the trainer's own: nothing to give back."""

    def generate_ids(
        self, encoded: list[list[int]], params: SamplingParams, generation: Generation, progress=None
    ) -> list[Completion]:
        """One completion per tokenized prompt, in order."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        torch.manual_seed(params.seed)
        use = self.policy.merged if self.weights == "merged" else self.policy.use
        with use(generation) as model, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for index, completion in zip(
                    batch, self._generate_batch(model, [encoded[i] for i in batch], params), strict=True
                ):
                    results[index] = completion
                if progress is not None:
                    progress.update(len(batch))
        return results  # type: ignore[return-value]

    def _generate_batch(self, model, token_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in token_ids])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in token_ids])
        device = next(model.parameters()).device
        # Every knob is set so that a model's own generation_config (Qwen ships top_k 20, top_p 0.8)
        # cannot fill in what the config leaves out: the run samples exactly as configured.
        sampling = {
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "typical_p": 1.0,
            "repetition_penalty": 1.0,
        }
        sampling_or_greedy = sampling if params.temperature > 0 else {"do_sample": False, "repetition_penalty": 1.0}
        if params.stop:
            sampling_or_greedy = {**sampling_or_greedy, "stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        end_of_turn = stop_token_ids(self.tokenizer, getattr(model, "generation_config", None))
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=end_of_turn,
            **sampling_or_greedy,
        )
        stops = {*end_of_turn, pad}  # rows that finished early are padded
        completions = []
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            kept = row if end is None else row[:end]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=None)
            if cut is not None:
                text = text[:cut]
            completions.append(Completion(text, len(kept), end is not None or cut is not None, tuple(kept)))
        return completions
