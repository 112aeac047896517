"""Tokens per second of the `hf` sampler, a generation sampled with its weights merged and as an adapter,
against plain transformers `generate` on M_init: the same prompts, seed and batches, in one process (what
`idempo bench` compares; the peer a user would otherwise pick is the plain `generate`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from idempo.chat import stop_token_ids
from idempo.config import SamplingParams
from idempo.models import Generation, Policy
from idempo.sampling.hf import HFSampler


def hf_sampling_rates(
    policy: Policy,
    plain: nn.Module,
    tokenizer,
    generation: Generation,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    batch_size: int,
    repeats: int = 3,
) -> dict[str, float]:
    """Tokens per second of each way (`adapter`, `merged`, `plain_generate`), the best of `repeats` timings,
    the ways taking turns so that a machine's load falls on each alike. `plain` is M_init loaded on its own."""
    samplers = {weights: HFSampler(policy, tokenizer, batch_size, weights) for weights in ("adapter", "merged")}
    ways: dict[str, Callable[[], int]] = {
        name: lambda s=sampler: sum(c.n_tokens for c in s.generate_ids(prompt_ids, params, generation))
        for name, sampler in samplers.items()
    }
    ways["plain_generate"] = lambda: plain_generate(plain, tokenizer, prompt_ids, params, batch_size)
    best = dict.fromkeys(ways, 0.0)
    for round in range(repeats + 1):  # round 0 warms up
        for name, way in ways.items():
            started = time.perf_counter()
            tokens = way()
            if round:
                best[name] = max(best[name], tokens / (time.perf_counter() - started))
    return best


@torch.inference_mode()
def plain_generate(model: nn.Module, tokenizer, prompt_ids: list[list[int]], params: SamplingParams, batch: int) -> int:
    """Answer tokens that `model.generate` samples for the prompts, in the hf sampler's batches (sorted by
    length, left-padded), with nothing else around it."""
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad, device = tokenizer.pad_token_id, next(model.parameters()).device
    ordered = sorted(prompt_ids, key=len)
    torch.manual_seed(params.seed)
    tokens = 0
    for start in range(0, len(ordered), batch):
        rows = ordered[start : start + batch]
        width = max(map(len, rows))
        output = model.generate(
            input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device),
            attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device),
            max_new_tokens=params.max_new_tokens,
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            pad_token_id=pad,
            eos_token_id=stops,
        )
        for row in output[:, width:].tolist():
            tokens += next((i for i, token in enumerate(row) if token in {*stops, pad}), len(row))
    return tokens
