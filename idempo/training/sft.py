"""Supervised finetuning of one generation: next-token loss on the answer tokens only.

A compact loop of our own rather than TRL's SFTTrainer: the whole step is on one screen, it trains the
policy module in place (so the sampler sees the new generation without a reload), it is deterministic
on CPU for a given seed, and the preference losses of later regimes reuse its batching and
log-probability code as plain functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from idempo.config import TrainingConfig
from idempo.models import Policy
from idempo.sampling.base import render

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


@dataclass(frozen=True)
class TrainStats:
    steps: int
    examples: int
    trained_tokens: int  # tokens that carry loss
    first_loss: float
    final_loss: float  # mean over the last epoch
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def encode_chat_example(tokenizer, prompt: str, response: str, max_len: int) -> Encoded:
    """Tokens of (user prompt, assistant answer) with no system prompt; labels on the answer only.

    The answer's tokens are the chat template's rendering of the whole conversation minus its
    rendering up to the generation prompt, so they end with the template's end-of-turn token. Prompt
    and answer are tokenized apart and joined, so the boundary matches what the sampler generates.
    """
    chat = [{"role": "user", "content": prompt}]
    head = render(tokenizer, chat)
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False)
    if full.startswith(head):
        tail = full[len(head) :]
    else:  # templates that rewrite earlier turns: fall back to answer + end of turn
        tail = response + tokenizer.eos_token
    tail = tail.rstrip("\n")  # the newline after end-of-turn is never generated
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    tail_ids = tail_ids[: max(0, max_len - len(head_ids))]
    return Encoded(head_ids + tail_ids, [IGNORE] * len(head_ids) + tail_ids)


def encode_document(tokenizer, prefix: str, continuation: str, max_len: int) -> Encoded:
    """A whole document (prefix and continuation, then end of text) with loss on every token: synthetic
    document finetuning teaches the belief as text, not as answers."""
    ids = tokenizer(prefix + continuation)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def learning_rate_factor(step: int, total: int, config: TrainingConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    floor = config.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(policy: Policy, examples: list[Encoded], config: TrainingConfig, seed: int, pad_id: int, progress=None):
    """Train `policy.module` in place on `examples`; returns what the run did."""
    if not examples:
        raise ValueError("no training examples")
    device = next(policy.module.parameters()).device

    def step(group: list[list[int]], backward) -> float:
        group_tokens = sum(_count_labels(examples, b) for b in group)
        step_loss = 0.0
        for batch in group:
            input_ids, labels, attention = collate([examples[i] for i in batch], pad_id, device)
            logits = policy.module(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
            loss_sum = token_loss_sum(logits, labels)
            backward(loss_sum / group_tokens)
            step_loss += loss_sum.item() / group_tokens
        return step_loss

    plan = policy.shard_plan(batch_plan(len(examples), config, seed))
    run = optimize(policy, plan, step, config, seed, progress)
    return TrainStats(
        steps=len(run.losses),
        examples=len(examples),
        trained_tokens=sum(sum(label != IGNORE for label in e.labels) for e in examples) * config.epochs,
        first_loss=run.losses[0],
        final_loss=run.final_loss,
        seconds=run.seconds,
    )


@dataclass(frozen=True)
class OptimizerRun:
    losses: list[float]  # one per optimizer step
    final_loss: float  # mean over the last epoch's steps
    seconds: float


def batch_plan(n_items: int, config: TrainingConfig, seed: int) -> list[list[list[int]]]:
    """Every optimizer step of the run as its micro-batches of item indices: a seeded shuffle per epoch.

    Known before training, so a loss that needs something per micro-batch (KTO's reference point)
    can be prepared for exactly the batches the run will see.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(config.epochs):
        order = torch.randperm(n_items, generator=generator).tolist()
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        accumulation = config.gradient_accumulation_steps
        steps += [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
    return steps


def optimize(policy: Policy, plan, step, config: TrainingConfig, seed: int, progress=None) -> OptimizerRun:
    """AdamW with the configured schedule over `plan`; `step(micro_batches, backward)` runs the forward
    passes of one optimizer step, hands each micro-batch's loss to `backward`, and returns the step's loss.
    Shared by every regime; the policy decides how gradients are applied (plain PyTorch or DeepSpeed)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = policy.module
    if config.gradient_checkpointing:
        _activation_checkpointing(model, True)
        model.enable_input_require_grads()
    parameters = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    total = len(plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: learning_rate_factor(i, total, config))
    steps_per_epoch = total // config.epochs
    losses: list[float] = []
    updates = policy.updates(optimizer, scheduler, config)
    model.train()
    try:
        for group in plan:
            step_loss = updates.mean_over_ranks(step(group, updates.backward))
            updates.step()
            losses.append(step_loss)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
    finally:
        model.eval()
        if config.gradient_checkpointing:
            _activation_checkpointing(model, False)
    last_epoch = losses[-steps_per_epoch:]
    return OptimizerRun(losses, sum(last_epoch) / len(last_epoch), time.perf_counter() - started)


def steps_for(n_examples: int, config: TrainingConfig) -> int:
    return math.ceil(n_examples / (config.batch_size * config.gradient_accumulation_steps)) * config.epochs


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not IGNORE."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _activation_checkpointing(model, enable: bool) -> None:
    """Transformers 5 renamed gradient checkpointing to activation checkpointing; accept both."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()


def _count_labels(examples: list[Encoded], batch: list[int]) -> int:
    return max(1, sum(sum(label != IGNORE for label in examples[i].labels[1:]) for i in batch))


def collate(batch: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels and attention mask."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch])
    attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
    return input_ids.to(device), labels.to(device), attention.to(device)
