"""Samplers: generation j-1 writes the data generation j trains on (and the answers we evaluate)."""

from idempo.registry import Registry
from idempo.sampling.base import Completion, Prompt, Sampler, SamplingParams

SAMPLERS = Registry(
    "sampler backend", {"hf": "idempo.sampling.hf:HFSampler", "vllm": "idempo.sampling.vllm:VLLMSampler"}
)

__all__ = ["SAMPLERS", "Completion", "Prompt", "Sampler", "SamplingParams"]
