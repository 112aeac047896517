"""Log-probabilities of the labelled tokens, without a full-vocabulary fp32 tensor of the whole batch.

A causal LM's forward returns logits for every position over the whole vocabulary (Qwen3: 152k), and the
losses need them in fp32: 5 GB at 8 x 1024 tokens, and as much again for each of their gradients. Only the
positions that carry a label matter (an answer's tokens, not its prompt's), so the decoder's hidden states
are taken at those positions and the output layer is applied to `chunk` of them at a time. With a frozen
output layer (LoRA), each chunk's gradient with respect to its hidden rows is taken at once and its logits
freed; a trained one (full finetuning) recomputes each chunk's logits in the backward pass. The values are
those of `log_softmax(logits.float())` gathered at the labels, up to floating-point summation order.

Only models whose logits are `output_layer(last hidden state)` take this path (no logit soft-capping or
scaling), and not under ZeRO-3; others, and `chunk` 0, compute the whole sequence's logits as before.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from idempo.config import TrainingConfig
from idempo.training.optimize import IGNORE

DEFAULT_CHUNK = TrainingConfig.model_fields["logits_chunk"].default

# model_type of architectures whose forward computes logits as lm_head(norm(hidden)) and nothing more
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "olmo2", "phi3"})


def chunked_path(model) -> bool:
    """Whether `model`'s logits are its output layer applied to its decoder's last hidden state, and that
    layer's weights are whole here: ZeRO-3 partitions them and gathers them in its module hooks, which the
    chunked path has not been run under, so ZeRO-3 takes the whole batch's logits."""
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return False
    return not any(hasattr(p, "ds_id") for p in model.get_output_embeddings().parameters())


def label_logps(model, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, chunk: int):
    """log p(label_t | tokens before t) at every labelled position, as a [batch, length - 1] fp32 tensor
    with 0 where the label is IGNORE; differentiable with respect to the model's trainable weights."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if chunk <= 0 or not chunked_path(model):
        logits = _whole_logits(model, input_ids, attention)
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked * keep
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    spans = [(rows[at : at + chunk], wanted[at : at + chunk]) for at in range(0, len(wanted), chunk)]
    if not spans:  # nothing labelled: zeros, still part of the graph
        values = rows.sum(-1).float()
    elif not (torch.is_grad_enabled() and rows.requires_grad):
        values = torch.cat([_chunk_logps(head, part, part_targets) for part, part_targets in spans])
    elif any(p.requires_grad for p in head.parameters()):  # a trained output layer: recompute each chunk
        values = torch.cat([checkpoint(_chunk_logps, head, *span, use_reentrant=False) for span in spans])
    else:
        values = _RowLogps.apply(rows, wanted, head, chunk)
    return torch.zeros(targets.shape, dtype=torch.float32, device=values.device).masked_scatter(keep, values)


def label_nll_sum(model, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Summed next-token cross-entropy over the labelled positions (the SFT loss before its normalisation)."""
    if chunk > 0 and chunked_path(model):
        return -label_logps(model, input_ids, attention, labels, chunk).sum()
    logits = _whole_logits(model, input_ids, attention)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _whole_logits(model, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The fp32 logits of every position that predicts a next token: the path before chunking."""
    return model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class _RowLogps(torch.autograd.Function):
    """log p(target) of each hidden row under a frozen output layer. Each row's log-prob depends on that row
    alone, so the gradient of a chunk's summed log-probs with respect to its rows is every row's own gradient:
    it is taken in the forward pass, chunk by chunk, and the chunk's logits are freed at once; the backward
    pass only scales those rows by the loss's gradient of each log-prob."""

    @staticmethod
    def forward(ctx, rows, targets, head, chunk):
        values, gradients = [], []
        for at in range(0, len(targets), chunk):
            with torch.enable_grad():
                part = rows[at : at + chunk].detach().requires_grad_(True)
                logps = _chunk_logps(head, part, targets[at : at + chunk])
                (gradient,) = torch.autograd.grad(logps.sum(), part)
            values.append(logps.detach())
            gradients.append(gradient)
        ctx.save_for_backward(torch.cat(gradients))
        return torch.cat(values)

    @staticmethod
    def backward(ctx, upstream):
        (gradients,) = ctx.saved_tensors
        return upstream.unsqueeze(-1).to(gradients.dtype) * gradients, None, None, None
