"""Preference training of one generation: DPO on (chosen, rejected) pairs, KTO on unpaired examples.

Log-probabilities are summed over the answer's tokens (the chat template's end-of-turn included), as in
the DPO paper. The reference model is fixed for the whole cycle (the weights the cycle starts from, or
M_init), so its log-probabilities are computed once, before training, for exactly the sequences the
run will see; no second copy of the model is held.

DPO:  loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
KTO:  r = pi(y|x) - ref(y|x);  z0 = max(0, mean over mismatched (x_i, y_k) of pi - ref), detached;
      desirable: w_D * (1 - sigmoid(beta * (r - z0)));  undesirable: w_U * (1 - sigmoid(beta * (z0 - r)))
The mismatched pairs of a micro-batch pair each prompt with the next example's answer (as TRL does);
a micro-batch of one has no mismatched pair and z0 = 0.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from idempo.config import TrainingConfig
from idempo.models import Generation, Policy
from idempo.training.sft import IGNORE, Encoded, batch_plan, collate, optimize

log = logging.getLogger(__name__)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair sigmoid DPO loss from summed log-probs."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    mismatched_policy_logps: torch.Tensor,
    mismatched_reference_logps: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """Per-example KTO loss; `desirable` is a bool tensor; the mismatched log-probs give the reference point."""
    if mismatched_policy_logps.numel():
        z0 = (mismatched_policy_logps - mismatched_reference_logps).mean().clamp(min=0).detach()
    else:
        z0 = torch.zeros((), device=policy_logps.device)
    reward = policy_logps - reference_logps
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (reward - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward))),
    )


def sequence_logps(model, examples: list[Encoded], pad_id: int) -> torch.Tensor:
    """Summed log-probability of each example's labelled tokens under `model`."""
    device = next(model.parameters()).device
    input_ids, labels, attention = collate(examples, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)


def reference_logps(policy: Policy, reference: Generation, examples: list[Encoded], pad_id: int, batch_size: int):
    """Summed log-probs of `examples` under the reference weights, computed once, without gradients."""
    values: list[float] = []
    with policy.use(reference) as model, torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            values += sequence_logps(model, examples[start : start + batch_size], pad_id).tolist()
    return values


@dataclass(frozen=True)
class PreferenceStats:
    steps: int
    examples: int
    first_loss: float
    final_loss: float  # mean over the last epoch
    reward_accuracy: float | None  # DPO: share of pairs whose implicit reward prefers the chosen answer, at the end
    mean_margin: float | None  # DPO: mean of (pi_c - ref_c) - (pi_r - ref_r) at the end
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def train_dpo(
    policy: Policy,
    pairs: list[tuple[Encoded, Encoded]],
    reference: Generation,
    beta: float,
    config: TrainingConfig,
    seed: int,
    pad_id: int,
    progress=None,
) -> PreferenceStats:
    """Train `policy.module` in place on (chosen, rejected) pairs against the fixed `reference`."""
    if not pairs:
        raise ValueError("no preference pairs")
    flat = [e for pair in pairs for e in pair]
    ref = torch.tensor(reference_logps(policy, reference, flat, pad_id, config.batch_size * 2)).view(-1, 2)

    def step(group: list[list[int]], backward) -> float:
        size = sum(len(b) for b in group)
        total = 0.0
        for batch in group:
            logps = sequence_logps(policy.module, [e for i in batch for e in pairs[i]], pad_id).view(-1, 2)
            reference_batch = ref[batch].to(logps.device)
            losses = dpo_loss(logps[:, 0], logps[:, 1], reference_batch[:, 0], reference_batch[:, 1], beta)
            backward(losses.sum() / size)
            total += losses.sum().item() / size
        return total

    run = optimize(policy, policy.shard_plan(batch_plan(len(pairs), config, seed)), step, config, seed, progress)
    margins = []
    with torch.inference_mode():
        for start in range(0, len(pairs), config.batch_size):
            batch = list(range(start, min(len(pairs), start + config.batch_size)))
            logps = sequence_logps(policy.module, [e for i in batch for e in pairs[i]], pad_id).view(-1, 2).cpu()
            margins += ((logps[:, 0] - ref[batch, 0]) - (logps[:, 1] - ref[batch, 1])).tolist()
    return PreferenceStats(
        steps=len(run.losses),
        examples=len(pairs),
        first_loss=run.losses[0],
        final_loss=run.final_loss,
        reward_accuracy=sum(m > 0 for m in margins) / len(margins),
        mean_margin=sum(margins) / len(margins),
        seconds=run.seconds,
    )


def train_kto(
    policy: Policy,
    examples: list[Encoded],
    desirable: list[bool],
    mismatched: MismatchEncoder,
    reference: Generation,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    config: TrainingConfig,
    seed: int,
    pad_id: int,
    progress=None,
) -> PreferenceStats:
    """Train on unpaired desirable/undesirable examples; `mismatched(i, k)` encodes prompt i with answer k."""
    if not examples:
        raise ValueError("no KTO examples")
    warn_on_kto_balance(desirable, desirable_weight, undesirable_weight)
    plan = policy.shard_plan(batch_plan(len(examples), config, seed))
    # Each micro-batch's mismatched pairs, and their reference log-probs, prepared before training.
    batches = list(dict.fromkeys(tuple(batch) for group in plan for batch in group))
    shifted = {b: [mismatched(i, b[(n + 1) % len(b)]) for n, i in enumerate(b)] if len(b) > 1 else [] for b in batches}
    batch_size = config.batch_size * 2
    ref = reference_logps(policy, reference, examples, pad_id, batch_size)
    flat_ref = iter(reference_logps(policy, reference, [e for b in batches for e in shifted[b]], pad_id, batch_size))
    mismatched_ref = {b: [next(flat_ref) for _ in shifted[b]] for b in batches}
    wanted = torch.tensor(desirable)

    def step(group: list[list[int]], backward) -> float:
        size = sum(len(b) for b in group)
        total = 0.0
        for batch in group:
            key = tuple(batch)
            logps = sequence_logps(policy.module, [examples[i] for i in batch], pad_id)
            device = logps.device
            if shifted[key]:
                kl_policy = sequence_logps(policy.module, shifted[key], pad_id)
            else:
                kl_policy = torch.zeros(0, device=device)
            losses = kto_loss(
                logps,
                torch.tensor([ref[i] for i in batch], device=device),
                wanted[batch].to(device),
                kl_policy,
                torch.tensor(mismatched_ref[key], device=device),
                beta,
                desirable_weight,
                undesirable_weight,
            )
            backward(losses.sum() / size)
            total += losses.sum().item() / size
        return total

    run = optimize(policy, plan, step, config, seed, progress)
    return PreferenceStats(
        steps=len(run.losses),
        examples=len(examples),
        first_loss=run.losses[0],
        final_loss=run.final_loss,
        reward_accuracy=None,
        mean_margin=None,
        seconds=run.seconds,
    )


class MismatchEncoder:
    """Encodes (prompt of example i, answer of example k) for KTO's reference point."""

    def __init__(self, encode, rows: list[dict]):
        self.encode = encode
        self.rows = rows

    def __call__(self, i: int, k: int) -> Encoded:
        return self.encode(self.rows[i]["prompt"], self.rows[k]["response"])


def warn_on_kto_balance(desirable: list[bool], desirable_weight: float, undesirable_weight: float) -> float | None:
    """The KTO paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]; say so when it is not."""
    n_desirable = sum(desirable)
    n_undesirable = len(desirable) - n_desirable
    if n_undesirable == 0 or undesirable_weight == 0:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if not 1 <= ratio <= 4 / 3:
        log.warning(
            "KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = %.3f, outside the "
            "recommended [1, 4/3] (n_desirable %d, n_undesirable %d); adjust preference.desirable_weight",
            ratio,
            n_desirable,
            n_undesirable,
        )
    return ratio
