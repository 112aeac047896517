"""Branching factor (Yang & Holtzman): the effective number of next-token choices a model keeps open.

BF = exp(H(Y|x) / N), estimated along the model's own sampled eval answers. Where the papers differ,
the convention is a named setting (`BranchingFactorConfig`); the defaults are the idempotence paper's
as we read it: 5 answers per question sampled at the evaluation temperature (0.7), per-token NLL
clipped at 4.0 nats, BF = exp(mean clipped NLL) pooled over every sampled token, with log-probs of the
raw model distribution (T = 1, what vLLM's logprobs return by default).

Per-token values, from next-token distributions p_t = softmax(logits_t / T), T = 1 (`raw`) or the
evaluation temperature (`evaluation`; T = 1 when decoding is greedy):

- nll: min(-log p_t(y_t), clip) of the sampled token y_t. exp of its mean is a Monte Carlo estimate of
  the BF, biased low relative to the true entropy-based BF (the clip cuts the long tail of rare tokens,
  so no token counts for more than e^clip choices, e^4 = 54.6) and noisy; it only needs the sampled
  token's log-probability, so it is cheap for long answers. Also reported as a curve over positions.
- entropy: H of p_t cut to its top-p nucleus and renormalised. Exact for that truncated distribution
  (no sampling noise at a given prefix); the nucleus keeps the long tail of a large vocabulary from
  dominating. Needs the whole distribution at every position.

Poolings of the per-token values (each with a 95% interval clustered by prompt, the prompts being the
independent units):

- pooled: exp(mean over every sampled token of every answer); the interval is the ratio estimator's
  (sum of values / number of tokens, over prompts) on the log scale, then exponentiated.
- per_answer: exp of each answer's mean, averaged over answers (cluster-robust t-interval).
- per_prompt: exp of each prompt's mean over its answers' tokens, averaged over prompts (t-interval
  over prompts).

Closed form for checking: a uniform distribution over k tokens has H = log k, so BF = k in every
convention.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from idempo.chat import Prompt, encode_prompt
from idempo.config import BranchingFactorConfig
from idempo.evaluation.stats import clustered_log_ratio, clustered_mean
from idempo.models import Generation, Policy

ESTIMATORS = ("entropy", "nll")


@dataclass(frozen=True)
class TokenStats:
    """Per answer token: entropy of the truncated distribution and NLL of the sampled token (nats)."""

    entropy: tuple[float, ...]
    nll: tuple[float, ...]


def logprob_temperature(settings: BranchingFactorConfig, evaluation_temperature: float) -> float:
    """The temperature the BF's log-probs are computed at: 1 for the raw distribution, else the evaluation's."""
    if settings.logprob_temperature == "raw" or evaluation_temperature <= 0:
        return 1.0
    return evaluation_temperature


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


def token_statistics(
    policy: Policy,
    tokenizer,
    prompts: list[Prompt],
    answers: list[tuple[int, ...]],
    generation: Generation,
    temperature: float,
    top_p: float,
    batch_size: int,
) -> list[TokenStats]:
    """Per answer token of `generation`'s own answers (their token ids), the entropy of its top-p next-token
    distribution and the NLL of the answer's token, read from the policy's module in this process, whatever
    engine sampled the answers (vLLM returns no full distributions)."""
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    results: list[TokenStats] = []
    with policy.use(generation) as model, torch.inference_mode():
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            rows = [
                (list(p), list(a))
                for p, a in zip(
                    prompt_ids[start : start + batch_size], answers[start : start + batch_size], strict=True
                )
            ]
            results.extend(_batch_statistics(model, tokenizer.pad_token_id, rows, device, temperature, top_p))
    return results


def _batch_statistics(model, pad: int, rows, device, temperature: float, top_p: float) -> list[TokenStats]:
    """One forward pass over left-padded prompt+answer rows; answers sit at the right edge."""
    full = [p + a for p, a in rows]
    width = max(len(ids) for ids in full)
    keep = max(len(a) for _, a in rows) + 1  # logits that predict every answer token
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in full], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in full], device=device)
    logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep).logits
    stats = []
    for row, (_, answer) in enumerate(rows):
        if not answer:
            stats.append(TokenStats((), ()))
            continue
        predicting = logits[row, keep - 1 - len(answer) : keep - 1]  # position t-1 predicts token t
        stats.append(token_stats(predicting, torch.tensor(answer, device=device), temperature, top_p))
    return stats


def answer_branching(stats: TokenStats, clip: float) -> dict[str, float | None]:
    """Per-answer BF by both estimators, exp of the answer's mean per-token value; None for an empty answer."""
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


def branching_estimate(answers: list[tuple[str, float, int]], pooling: str) -> dict:
    """BF and its prompt-clustered 95% interval from (prompt, sum of per-token values, tokens) per answer.

    Answers without tokens carry no information and are left out. `n` counts the answers used, `tokens`
    their tokens, `clusters` their prompts."""
    kept = [(p, total, count) for p, total, count in answers if count > 0]
    base = {"n": len(kept), "tokens": sum(c for _, _, c in kept)}
    if not kept:
        return {"mean": None, "ci95": [None, None], "se": None, "clusters": 0, **base}
    by_prompt: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for prompt, total, count in kept:
        by_prompt[prompt][0] += total
        by_prompt[prompt][1] += count
    if pooling == "pooled":
        log = clustered_log_ratio([s for s, _ in by_prompt.values()], [c for _, c in by_prompt.values()])
        low, high = log["ci95"]
        bf = math.exp(log["mean"])
        return {
            "mean": bf,
            "ci95": [None, None] if low is None else [math.exp(low), math.exp(high)],
            "se": None if log["se"] is None else bf * log["se"],  # delta method, for reference
            "log_se": log["se"],
            "clusters": log["clusters"],
            **base,
        }
    if pooling == "per_answer":
        summary = clustered_mean([math.exp(t / c) for _, t, c in kept], [p for p, _, _ in kept])
    elif pooling == "per_prompt":
        summary = clustered_mean([math.exp(s / c) for s, c in by_prompt.values()], list(by_prompt))
    else:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: 'pooled', 'per_answer', 'per_prompt'")
    return {"mean": summary["mean"], "ci95": summary["ci95"], "se": summary["se"], "clusters": len(by_prompt), **base}


def answer_values(row: dict, estimator: str) -> tuple[str, float, int]:
    """(prompt, sum of the answer's per-token values, tokens) of an eval row that carries the BF."""
    tokens = len(row.get("token_nll") or ())
    bf = row.get(f"bf_{estimator}")
    if bf is None or tokens == 0:
        return row["prompt"], 0.0, 0
    return row["prompt"], tokens * math.log(bf), tokens


def summarize_branching(rows: list[dict], settings: BranchingFactorConfig) -> dict:
    """metrics.json's `branching_factor` from the eval rows that carry it (`bf_entropy`, `bf_nll`,
    `token_nll`): both estimators under the configured pooling, the headline one at the top level."""
    carrying = [r for r in rows if "token_nll" in r]
    by_estimator = {
        name: branching_estimate([answer_values(r, name) for r in carrying], settings.pooling) for name in ESTIMATORS
    }
    return {
        "estimator": settings.estimator,
        "pooling": settings.pooling,
        "logprob_temperature": settings.logprob_temperature,
        "samples_per_prompt": settings.samples_per_prompt,
        **by_estimator[settings.estimator],
        "entropy": by_estimator["entropy"],
        "nll": by_estimator["nll"],
        "nll_curve": nll_curve(
            [r["token_nll"] for r in carrying if r["token_nll"]], settings.nll_clip, settings.curve_bin
        ),
    }
