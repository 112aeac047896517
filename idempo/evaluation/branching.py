"""Branching factor (Yang & Holtzman): the effective number of next-token choices a model keeps open.

BF = exp(H(Y|x) / N), estimated along the model's own sampled eval answers, from its next-token
distributions p_t = softmax(logits_t / T) at the eval sampling temperature T (T = 1 when decoding is
greedy). Two estimators, both per answer, then averaged over answers with a 95% interval:

- entropy: exp(mean_t H(p_t restricted to its top-p nucleus, renormalised)). Exact for the truncated
  distribution; the nucleus keeps the long tail of a large vocabulary from dominating. Best for short
  answers.
- nll: exp(mean_t min(-log p_t(y_t), clip)) over the sampled tokens y_t, the idempotence paper's
  estimator (clip 4.0 nats). A Monte Carlo estimate of the same entropy, cheap for long answers; the
  clip bounds the weight of rare tokens. Also reported as a curve over answer positions, in bins.

Closed form for checking: a uniform distribution over k tokens has H = log k, so BF = k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from idempo.config import BranchingFactorConfig
from idempo.evaluation.stats import mean_ci


@dataclass(frozen=True)
class TokenStats:
    """Per answer token: entropy of the truncated distribution and NLL of the sampled token (nats)."""

    entropy: tuple[float, ...]
    nll: tuple[float, ...]


def sampling_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.float() / (temperature if temperature > 0 else 1.0)


def nucleus_entropy(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Entropy (nats) of each row's distribution cut to its top-p nucleus and renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    ordered = probs.sort(dim=-1, descending=True).values
    before = ordered.cumsum(dim=-1) - ordered  # mass of the more likely tokens
    kept = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return -torch.where(kept > 0, kept * kept.log(), torch.zeros_like(kept)).sum(dim=-1)


def sampled_nll(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """-log p(y_t) of each row's sampled token."""
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def token_stats(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, top_p: float) -> TokenStats:
    """Stats of one answer from the logits that predicted its tokens ([n_tokens, vocab])."""
    scaled = sampling_logits(logits, temperature)
    return TokenStats(
        entropy=tuple(nucleus_entropy(scaled, top_p).tolist()), nll=tuple(sampled_nll(scaled, token_ids).tolist())
    )


def answer_branching(stats: TokenStats, clip: float) -> dict[str, float | None]:
    """Per-answer BF by both estimators; None for an empty answer."""
    if not stats.nll:
        return {"entropy": None, "nll": None}
    return {
        "entropy": math.exp(sum(stats.entropy) / len(stats.entropy)),
        "nll": math.exp(sum(min(v, clip) for v in stats.nll) / len(stats.nll)),
    }


def nll_curve(per_answer_nll: list[list[float]], clip: float, bin_size: int) -> list[dict]:
    """BF from clipped NLL per bin of answer positions, pooled over answers that reach the bin."""
    curve = []
    longest = max((len(n) for n in per_answer_nll), default=0)
    for start in range(0, longest, bin_size):
        values = [min(v, clip) for nll in per_answer_nll for v in nll[start : start + bin_size]]
        curve.append({"start": start, "bf": math.exp(sum(values) / len(values)), "tokens": len(values)})
    return curve


def summarize_branching(rows: list[dict], settings: BranchingFactorConfig) -> dict:
    """metrics.json's `branching_factor` from eval rows carrying `bf_entropy`, `bf_nll` and `token_nll`."""
    by_estimator = {
        name: mean_ci([r[f"bf_{name}"] for r in rows if r.get(f"bf_{name}") is not None]) for name in ("entropy", "nll")
    }
    headline = by_estimator[settings.estimator]
    return {
        "estimator": settings.estimator,
        **headline,
        "entropy": by_estimator["entropy"],
        "nll": by_estimator["nll"],
        "nll_curve": nll_curve(
            [r["token_nll"] for r in rows if r.get("token_nll")], settings.nll_clip, settings.curve_bin
        ),
    }
