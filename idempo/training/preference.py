"""Preference training of one generation: DPO on (chosen, rejected) pairs, KTO on unpaired examples.

Log-probabilities are summed over the answer's tokens (the chat template's end-of-turn included), as in
the DPO paper. The reference model is fixed for the whole cycle (the weights the cycle starts from, or
M_init), so its log-probabilities are computed once, before training, for exactly the sequences the
run will see; no second copy of the model is held.

DPO:  loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
KTO:  r = pi(y|x) - ref(y|x);  z0 = max(0, mean over mismatched (x_i, y_k) of pi - ref), detached;
      desirable: w_D * (1 - sigmoid(beta * (r - z0)));  undesirable: w_U * (1 - sigmoid(beta * (z0 - r)))
The mismatched pairs of a micro-batch pair each prompt with the previous example's answer (TRL rotates
completions the same way); a micro-batch of one pairs its prompt with the answer of the nearest example
of another prompt. Under data-parallel training z0 is the mean over the whole micro-batch, every rank's
share summed across ranks before the clamp (as TRL gathers it across processes).

Dropout is off while a preference loss trains (TRL's `disable_dropout`): the reference log-probs are
computed without dropout, so with dropout on the policy would differ from its reference at step 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F

from idempo.config import TrainingConfig
from idempo.models import Generation, Policy
from idempo.training.logprobs import DEFAULT_CHUNK, label_logps
from idempo.training.optimize import ONE_PROCESS, Encoded, Ranks, batch_plan, collate, optimize

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
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-example KTO loss; `desirable` is a bool tensor; the mismatched log-probs give the reference point.

    `sum_over_ranks` sums a tensor over the data-parallel ranks that share the micro-batch (None: this
    process holds all of it)."""
    z0 = kto_reference_point(mismatched_policy_logps, mismatched_reference_logps, sum_over_ranks)
    reward = policy_logps - reference_logps
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (reward - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - reward))),
    )


def kto_reference_point(
    mismatched_policy_logps: torch.Tensor,
    mismatched_reference_logps: torch.Tensor,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """z0 = max(0, mean log-ratio of the mismatched pairs), detached; the sum and the count are reduced
    over ranks before the mean, so every rank sees the micro-batch's z0."""
    ratios = (mismatched_policy_logps - mismatched_reference_logps).detach().float()
    totals = torch.stack([ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)])
    if sum_over_ranks is not None:
        totals = sum_over_ranks(totals)
    if totals[1] == 0:
        return torch.zeros((), device=ratios.device)
    return (totals[0] / totals[1]).clamp(min=0)


@contextmanager
def dropout_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Every dropout layer at p = 0 for the block (TRL's disable_dropout for preference training)."""
    layers = [(layer, layer.p) for layer in module.modules() if isinstance(layer, torch.nn.Dropout)]
    for layer, _ in layers:
        layer.p = 0.0
    try:
        yield
    finally:
        for layer, p in layers:
            layer.p = p


def sequence_logps(model, examples: list[Encoded], pad_id: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed log-probability of each example's labelled tokens under `model` (`chunk`: label_logps)."""
    device = next(model.parameters()).device
    input_ids, labels, attention = collate(examples, pad_id, device)
    return label_logps(model, input_ids, attention, labels, chunk).sum(dim=-1)


def reference_logps(
    policy: Policy,
    reference: Generation,
    examples: list[Encoded],
    pad_id: int,
    batch_size: int,
    chunk: int = DEFAULT_CHUNK,
):
    """Summed log-probs of `examples` under the reference weights, computed once, without gradients; the
    policy's own weights are left as they were (a reference of M_{j-1} for a policy that starts afresh)."""
    values: list[float] = []
    swaps = reference.path is not None and policy.loaded != reference
    with policy.weights_kept() if swaps else nullcontext(), policy.use(reference) as model, torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            values += sequence_logps(model, examples[start : start + batch_size], pad_id, chunk).tolist()
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
    losses: list[float] = field(default_factory=list)  # one per optimizer step: W&B's per-step loss

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
    ranks: Ranks = ONE_PROCESS,
) -> PreferenceStats:
    """Train `policy.module` in place on (chosen, rejected) pairs against the fixed `reference`."""
    if not pairs:
        raise ValueError("no preference pairs")
    flat = [e for pair in pairs for e in pair]
    ref = torch.tensor(
        reference_logps(policy, reference, flat, pad_id, config.batch_size * 2, config.logits_chunk)
    ).view(-1, 2)

    def step(group: list[list[int]], backward) -> float:
        size = sum(len(b) for b in group)
        total = 0.0
        for batch in group:
            logps = sequence_logps(
                policy.module, [e for i in batch for e in pairs[i]], pad_id, config.logits_chunk
            ).view(-1, 2)
            reference_batch = ref[batch].to(logps.device)
            losses = dpo_loss(logps[:, 0], logps[:, 1], reference_batch[:, 0], reference_batch[:, 1], beta)
            backward(losses.sum() / size)
            total += losses.sum().item() / size
        return total

    with dropout_disabled(policy.module):
        run = optimize(policy, ranks.shard(batch_plan(len(pairs), config, seed)), step, config, seed, progress, ranks)
    margins = []
    with torch.inference_mode():
        for start in range(0, len(pairs), config.batch_size):
            batch = list(range(start, min(len(pairs), start + config.batch_size)))
            logps = (
                sequence_logps(policy.module, [e for i in batch for e in pairs[i]], pad_id, config.logits_chunk)
                .view(-1, 2)
                .cpu()
            )
            margins += ((logps[:, 0] - ref[batch, 0]) - (logps[:, 1] - ref[batch, 1])).tolist()
    return PreferenceStats(
        steps=len(run.losses),
        examples=len(pairs),
        first_loss=run.losses[0],
        final_loss=run.final_loss,
        reward_accuracy=sum(m > 0 for m in margins) / len(margins),
        mean_margin=sum(margins) / len(margins),
        seconds=run.seconds,
        losses=run.losses,
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
    ranks: Ranks = ONE_PROCESS,
) -> PreferenceStats:
    """Train on unpaired desirable/undesirable examples; `mismatched(i, k)` encodes prompt i with answer k."""
    if not examples:
        raise ValueError("no KTO examples")
    warn_on_kto_balance(desirable, desirable_weight, undesirable_weight)
    full_plan = batch_plan(len(examples), config, seed)
    plan = ranks.shard(full_plan)
    rank, world = ranks.rank, ranks.world
    # The mismatched pairs of each local micro-batch, and their reference log-probs, prepared before
    # training in the order the steps run.
    shifted = [
        [mismatched(i, k) for i, k in pairs] for pairs in local_mismatched_pairs(full_plan, mismatched, rank, world)
    ]
    batch_size = config.batch_size * 2
    ref = reference_logps(policy, reference, examples, pad_id, batch_size, config.logits_chunk)
    flat_ref = iter(
        reference_logps(
            policy, reference, [e for pairs in shifted for e in pairs], pad_id, batch_size, config.logits_chunk
        )
    )
    prepared = iter([(pairs, [next(flat_ref) for _ in pairs]) for pairs in shifted])
    wanted = torch.tensor(desirable)

    def step(group: list[list[int]], backward) -> float:
        size = sum(len(b) for b in group)
        total = 0.0
        for batch in group:
            pairs, pairs_ref = next(prepared)
            logps = sequence_logps(policy.module, [examples[i] for i in batch], pad_id, config.logits_chunk)
            device = logps.device
            if pairs:
                kl_policy = sequence_logps(policy.module, pairs, pad_id, config.logits_chunk)
            else:  # a rank without mismatched pairs still takes part in the reduction
                kl_policy = torch.zeros(0, device=device)
            losses = kto_loss(
                logps,
                torch.tensor([ref[i] for i in batch], device=device),
                wanted[batch].to(device),
                kl_policy,
                torch.tensor(pairs_ref, device=device),
                beta,
                desirable_weight,
                undesirable_weight,
                sum_over_ranks=ranks.sum if world > 1 else None,
            )
            backward(losses.sum() / size)
            total += losses.sum().item() / size
        return total

    with dropout_disabled(policy.module):
        run = optimize(policy, plan, step, config, seed, progress, ranks)
    return PreferenceStats(
        steps=len(run.losses),
        examples=len(examples),
        first_loss=run.losses[0],
        final_loss=run.final_loss,
        reward_accuracy=None,
        mean_margin=None,
        seconds=run.seconds,
        losses=run.losses,
    )


def local_mismatched_pairs(full_plan, mismatched: MismatchEncoder, rank: int, world: int) -> list[list[tuple]]:
    """For every micro-batch of the run, in order, this rank's share of its mismatched (prompt i, answer k)
    pairs: those of positions rank, rank + world, ... of the whole micro-batch, so that the shares of all
    ranks together are the micro-batch's pairs (and a rank beyond the micro-batch's size has none)."""
    return [
        list(zip(full, mismatched.partners(full), strict=True))[rank::world]
        for full_group in full_plan
        for full in full_group
    ]


class MismatchEncoder:
    """Encodes (prompt of example i, answer of example k) for KTO's reference point."""

    def __init__(self, encode, rows: list[dict]):
        self.encode = encode
        self.rows = rows

    def __call__(self, i: int, k: int) -> Encoded:
        return self.encode(self.rows[i]["prompt"], self.rows[k]["response"])

    def partners(self, batch: list[int]) -> list[int]:
        """The example whose answer each item of a micro-batch is paired with: the previous item's
        (rotated, as TRL does); for a micro-batch of one, the nearest following example of another prompt."""
        if len(batch) > 1:
            return [batch[n - 1] for n in range(len(batch))]
        (i,) = batch
        n = len(self.rows)
        others = [k % n for k in range(i + 1, i + n) if self.rows[k % n]["prompt"] != self.rows[i]["prompt"]]
        return [others[0] if others else (i + 1) % n]


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
