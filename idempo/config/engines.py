"""Engine sections: how a trial samples, trains and loads its model. Each names its engine by a name the
registries hold (idempo.registry), checked here without importing the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from idempo.config.base import Section, choices
from idempo.registry import SAMPLERS

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class SamplingParams:
    """One generate call's decoding, as the samplers take it."""

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int  # draws are reproducible for a given seed, batch size and device
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings


class Decodes:
    """A section that says how to decode (temperature, top_p, max_new_tokens): `.params(seed)` is the
    request a sampler takes."""

    def params(self, seed: int, stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens, seed, stop)


class Decoding(Section, Decodes):
    """Decoding assembled from several sections (D_seed's, self-rewarding candidates' and judgments')."""

    temperature: float = Field(ge=0, description="0 means greedy decoding.")
    top_p: float = Field(gt=0, le=1, description="Nucleus: the smallest set of tokens with this much mass.")
    max_new_tokens: int = Field(gt=0, description="Longest answer in tokens.")


class VLLMConfig(Section):
    """The vLLM engine of a trial (sampling.backend: vllm): M_init loaded once, generations as LoRA requests."""

    gpu_memory_utilization: float = Field(
        0.45, gt=0, lt=1, description="Share of GPU memory the engine may take; the trainer shares the rest."
    )
    sleep_while_training: Literal[True, False, "auto"] = Field(
        True,
        description="true: offload the engine's weights and drop its KV cache while each generation trains; "
        "false: never; auto: only when the GPU's free memory, the engine awake, is short of what the trial's "
        "last training grew by (the first training always sleeps: nothing is measured yet).",
    )
    enforce_eager: bool = Field(False, description="Skip torch.compile and CUDA graphs: faster start, slower decode.")
    max_model_len: int | None = Field(None, gt=0, description="Longest prompt + answer; null: the model's own limit.")
    max_num_seqs: int = Field(256, gt=0, description="Sequences decoded at once.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one engine spans (within the trial's bundle).")


class SamplingConfig(Section, Decodes):
    """How generation j-1 writes the data generation j trains on."""

    backend: str = Field("hf", description="Sampler engine, by name: hf (transformers generate) or vllm (GPUs).")
    temperature: float = Field(0.8, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus: the smallest set of tokens with this much mass.")
    max_new_tokens: int = Field(1024, gt=0, description="Longest answer in tokens (authors: 1024).")
    batch_size: int = Field(32, gt=0, description="Prompts per generate call (hf backend).")
    weights: Literal["merged", "adapter"] = Field(
        "merged",
        description="How a LoRA generation is sampled. merged: its adapter folded into M_init's weights for the "
        "call (base-model speed); adapter: the adapter computed beside them, per request (figures made before "
        "this setting). Draws are the same generation's, equal up to floating-point rounding.",
    )
    vllm: VLLMConfig = Field(VLLMConfig(), description="The vllm engine (sampling.backend: vllm).")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler backend; allowed: {choices(SAMPLERS)}")
        return value


class LoraConfigSection(Section):
    """The LoRA adapter each generation is (PEFT's LoraConfig)."""

    rank: int = Field(16, gt=0, description="r: the adapter's rank (authors: 16).")
    alpha: float = Field(32.0, gt=0, description="lora_alpha: the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="lora_dropout (off while preference losses train).")
    target_modules: str | list[str] = Field("all-linear", description="PEFT target modules.")


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO for models whose weights, gradients or optimizer states do not fit one GPU."""

    stage: Literal[2, 3] = Field(3, description="2: shard gradients and optimizer states; 3: also the weights.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="Keep sharded weights in CPU memory (stage 3).")
    workers: int = Field(
        1,
        gt=0,
        description="Training ranks, one GPU each. 1: the trial's own GPU, in its process; more: Ray actors "
        "on GPUs of their own (bundles of the trial's placement group in a sweep).",
    )

    @model_validator(mode="after")
    def _offload_needs_stage_3(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3 (only stage 3 shards the weights)")
        return self


class TrainingConfig(Section):
    """Finetuning of each generation (authors' SFT defaults)."""

    finetune: Literal["lora", "full"] = Field(
        "lora", description="lora: each generation is an adapter on frozen M_init; full: all weights (small models)."
    )
    lora: LoraConfigSection = Field(LoraConfigSection(), description="The adapter (training.finetune: lora).")
    learning_rate: float = Field(1.5e-4, gt=0, description="Peak learning rate (regimes set their own default).")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="After warmup: constant, or cosine decay.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Share of steps with linear warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to this fraction of the peak.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(2, gt=0, description="Examples (dpo: pairs) per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, gt=0, description="Passes over a generation's training data.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    max_seq_len: int = Field(
        2048,
        ge=2,
        description="Longer examples are truncated (completion end first); an example left with no answer "
        "token is an error. At least 2: one token read, one predicted.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    logits_chunk: int = Field(
        256,
        ge=0,
        description="Labelled tokens whose fp32 logits are computed at once, so no full-vocabulary tensor of the "
        "whole batch is kept; 0: the whole batch's logits at once (the loss is the same up to rounding; 0 "
        "reproduces figures made before this setting).",
    )
    deepspeed: DeepSpeedConfig | None = Field(
        None, description="Train each generation under DeepSpeed ZeRO (GPUs only); null: plain PyTorch."
    )


class LoadingConfig(Section):
    """How M_init is loaded."""

    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, else float32."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model (off unless you trust it).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads torch computes with; null: the cores given to the trial (its Ray CPUs in a "
        "sweep, the process's CPU affinity otherwise).",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("unknown device; allowed: 'auto', 'cpu', 'mps', 'cuda', 'cuda:N'")
        return value
