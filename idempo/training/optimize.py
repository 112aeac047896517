"""What every regime's training shares: examples as token ids, a seeded plan of micro-batches, AdamW with
the configured schedule, and how gradients become updates (plain PyTorch here; DeepSpeed in
idempo.training.zero), so that a regime's loss is all that differs between regimes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from idempo.config import TrainingConfig
from idempo.data import NothingToTrain
from idempo.models import Policy

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


class Ranks:
    """The data-parallel ranks a training run spans: here one process, which holds every micro-batch whole
    and applies its gradients with plain PyTorch. (DeepSpeed's ranks: idempo.training.zero.ZeroRanks.)"""

    rank, world = 0, 1

    def shard(self, plan: list[list[list[int]]]) -> list[list[list[int]]]:
        """This rank's share of each micro-batch of a training plan (all of it here)."""
        return plan

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks (a statistic of the whole micro-batch)."""
        return value

    def updates(self, policy: Policy, optimizer, scheduler, config: TrainingConfig) -> Updates:
        """How gradients become weight updates during one training run."""
        return Updates(policy.trainable_parameters(), optimizer, scheduler, config.max_grad_norm)


ONE_PROCESS = Ranks()


class Updates:
    """Backward passes accumulate into .grad; a step clips, updates, advances the schedule, clears."""

    def __init__(self, parameters, optimizer, scheduler, max_grad_norm: float | None):
        self.parameters, self.optimizer, self.scheduler = parameters, optimizer, scheduler
        self.max_grad_norm = max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def mean_over_ranks(self, value: float) -> float:
        return value

    def step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


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


def optimize(
    policy: Policy, plan, step, config: TrainingConfig, seed: int, progress=None, ranks: Ranks = ONE_PROCESS
) -> OptimizerRun:
    """AdamW with the configured schedule over `plan`; `step(micro_batches, backward)` runs the forward
    passes of one optimizer step, hands each micro-batch's loss to `backward`, and returns the step's loss.
    Shared by every regime; `ranks` decides how gradients are applied (plain PyTorch or DeepSpeed)."""
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
    updates = ranks.updates(policy, optimizer, scheduler, config)
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


def _activation_checkpointing(model, enable: bool) -> None:
    """Transformers 5 renamed gradient checkpointing to activation checkpointing; accept both."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()


def collate(batch: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels and attention mask."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch])
    attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
    return input_ids.to(device), labels.to(device), attention.to(device)


def require_answer_tokens(examples: list[Encoded], max_seq_len: int, label: str) -> None:
    """Every example keeps at least one token with loss; a prompt that fills training.max_seq_len would
    otherwise train on nothing and look like a finished generation. Such an example is an error, not
    dropped: leaving it out would quietly train on fewer examples than n_seed or n_sampled says."""
    empty = [i for i, e in enumerate(examples) if all(label_id == IGNORE for label_id in e.labels[1:])]
    if empty:
        lengths = sorted(len(examples[i].input_ids) for i in empty)  # all prompt: no answer token is left
        span = f"{lengths[0]} tokens" if lengths[0] == lengths[-1] else f"{lengths[0]} to {lengths[-1]} tokens"
        raise NothingToTrain(
            f"{label}: {len(empty)} of {len(examples)} examples have no answer token left after truncation to "
            f"training.max_seq_len {max_seq_len}: their prompts take {span} (the first is example {empty[0]}); "
            f"allowed: a training.max_seq_len above {lengths[-1]}, or shorter prompts"
        )
