"""One generation's training by its regime's loss, wherever the policy lives (the trial's process or a
DeepSpeed training worker): the data rows of a cycle in, the training statistics out."""

from __future__ import annotations

from idempo.artifacts import SEED_CYCLE
from idempo.config import ExperimentConfig
from idempo.models import INITIAL, Generation, Policy
from idempo.progress import Reporter
from idempo.training.preference import MismatchEncoder, train_dpo, train_kto
from idempo.training.sft import encode_chat_example, encode_document, steps_for, train_sft


def fit_generation(
    policy: Policy,
    tokenizer,
    config: ExperimentConfig,
    cycle: int,
    rows: list[dict],
    seed: int,
    start: Generation,
    reporter: Reporter,
    label: str,
) -> dict:
    """Train `policy` in place by the regime's loss. M_seed of self_reward is trained by SFT."""
    training, pad = config.training, tokenizer.pad_token_id
    regime = "sft" if cycle == SEED_CYCLE and config.regime == "self_reward" else config.regime
    rows = [r for r in rows if r.get("kept", True)]
    if not rows:  # self_reward with every prompt a tie: M_j keeps the start weights
        return {"steps": 0, "examples": 0, "skipped": "no pairs: every prompt's candidates tied or went unscored"}

    def encode(prompt: str, response: str):
        return encode_chat_example(tokenizer, prompt, response, training.max_seq_len)

    preference = config.preference
    reference = INITIAL if preference.reference == "initial" else start
    if regime in ("sft", "sdf"):
        if regime == "sdf":
            examples = [encode_document(tokenizer, r["prompt"], r["response"], training.max_seq_len) for r in rows]
        else:
            examples = [encode(r["prompt"], r["response"]) for r in rows]
        with reporter.phase(label, steps_for(len(examples), training), "steps") as bar:
            return train_sft(policy, examples, training, seed, pad, bar).to_dict()
    if regime in ("dpo", "self_reward"):
        pairs = [(encode(r["prompt"], r["response"]), encode(r["prompt"], r["rejected"])) for r in rows]
        with reporter.phase(label, steps_for(len(pairs), training), "steps") as bar:
            stats = train_dpo(policy, pairs, reference, config.beta, training, seed, pad, bar)
        return {**stats.to_dict(), "reference": reference.name}
    # kto: M_{j-1}'s answers are desirable, the rejected source's undesirable, unpaired
    unpaired = [{"prompt": r["prompt"], "response": r[key]} for r in rows for key in ("response", "rejected")]
    desirable = [key == "response" for _ in rows for key in ("response", "rejected")]
    examples = [encode(r["prompt"], r["response"]) for r in unpaired]
    with reporter.phase(label, steps_for(len(examples), training), "steps") as bar:
        stats = train_kto(
            policy,
            examples,
            desirable,
            MismatchEncoder(encode, unpaired),
            reference,
            config.beta,
            preference.desirable_weight,
            preference.undesirable_weight,
            training,
            seed,
            pad,
            bar,
        )
    return {**stats.to_dict(), "reference": reference.name}
