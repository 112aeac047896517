"""Supervised finetuning of one generation: next-token loss on the answer tokens only.

A compact loop of our own rather than TRL's SFTTrainer: the whole step is on one screen, it trains the
policy module in place (so the sampler sees the new generation without a reload), it is deterministic
on CPU for a given seed. Batching, the optimizer and its schedule are every regime's
(idempo.training.optimize).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from idempo.chat import render
from idempo.config import TrainingConfig
from idempo.models import Policy
from idempo.training.logprobs import label_nll_sum
from idempo.training.optimize import IGNORE, ONE_PROCESS, Encoded, Ranks, batch_plan, collate, optimize


@dataclass(frozen=True)
class TrainStats:
    steps: int
    examples: int
    trained_tokens: int  # tokens that carry loss
    first_loss: float
    final_loss: float  # mean over the last epoch
    seconds: float
    losses: list[float] = field(default_factory=list)  # one per optimizer step: W&B's per-step loss

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


def train_sft(
    policy: Policy,
    examples: list[Encoded],
    config: TrainingConfig,
    seed: int,
    pad_id: int,
    progress=None,
    ranks: Ranks = ONE_PROCESS,
):
    """Train `policy.module` in place on `examples`; returns what the run did."""
    if not examples:
        raise ValueError("no training examples")
    device = next(policy.module.parameters()).device

    def step(group: list[list[int]], backward) -> float:
        group_tokens = sum(_count_labels(examples, b) for b in group)
        step_loss = 0.0
        for batch in group:
            input_ids, labels, attention = collate([examples[i] for i in batch], pad_id, device)
            loss_sum = label_nll_sum(policy.module, input_ids, attention, labels, config.logits_chunk)
            backward(loss_sum / group_tokens)
            step_loss += loss_sum.item() / group_tokens
        return step_loss

    run = optimize(policy, ranks.shard(batch_plan(len(examples), config, seed)), step, config, seed, progress, ranks)
    return TrainStats(
        steps=len(run.losses),
        examples=len(examples),
        trained_tokens=sum(sum(label != IGNORE for label in e.labels) for e in examples) * config.epochs,
        first_loss=run.losses[0],
        final_loss=run.final_loss,
        seconds=run.seconds,
        losses=run.losses,
    )


def _count_labels(examples: list[Encoded], batch: list[int]) -> int:
    return max(1, sum(sum(label != IGNORE for label in examples[i].labels[1:]) for i in batch))
