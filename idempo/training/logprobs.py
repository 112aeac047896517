"""Log-probabilities of the labelled tokens, without a full-vocabulary fp32 tensor.

A causal LM's forward returns logits for every position over the whole vocabulary (Qwen3: 152k), and the
losses need them in fp32: 5 GB at 8 x 1024 tokens, plus as much again for the gradient. Only the positions
that carry a label matter (an answer's tokens, not its prompt's), so the decoder's hidden states are taken
at those positions and the output layer is applied to `chunk` of them at a time, each chunk's logits
recomputed in the backward pass instead of kept (activation checkpointing). The values are those of
`log_softmax(logits.float())` gathered at the labels: the same loss, up to floating-point summation order.

Only models whose logits are `output_layer(last hidden state)` take this path (no logit soft-capping or
scaling); others, and `chunk` 0, compute the whole sequence's logits as before.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from idempo.config import TrainingConfig
from idempo.training.optimize import IGNORE

DEFAULT_CHUNK = TrainingConfig.model_fields["logits_chunk"].default

# model_type of architectures whose forward computes logits as lm_head(norm(hidden)) and nothing more
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "olmo2", "phi3"})


def chunked_path(model) -> bool:
    """Whether `model`'s logits are its output layer applied to its decoder's last hidden state."""
    return getattr(getattr(model, "config", None), "model_type", None) in PLAIN_HEAD_MODELS


def label_logps(model, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, chunk: int):
    """log p(label_t | tokens before t) at every labelled position, as a [batch, length - 1] fp32 tensor
    with 0 where the label is IGNORE; differentiable with respect to the model's trainable weights."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if chunk <= 0 or not chunked_path(model):
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked * keep
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    # with gradients, each chunk's logits are recomputed in the backward pass rather than kept
    logps = partial(checkpoint, _chunk_logps, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logps
    picked = [logps(head, rows[at : at + chunk], wanted[at : at + chunk]) for at in range(0, len(wanted), chunk)]
    values = torch.cat(picked) if picked else rows.new_zeros(0, dtype=torch.float32)
    return torch.zeros(targets.shape, dtype=torch.float32, device=values.device).masked_scatter(keep, values)


def label_nll_sum(model, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Summed next-token cross-entropy over the labelled positions (the SFT loss before its normalisation)."""
    if chunk > 0 and chunked_path(model):
        return -label_logps(model, input_ids, attention, labels, chunk).sum()
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
