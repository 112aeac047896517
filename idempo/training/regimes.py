"""One generation's training by its regime's loss, wherever the policy lives (the trial's process or a
DeepSpeed training worker): the data rows of a cycle in, the training statistics out."""

from __future__ import annotations

from idempo.artifacts import SEED_CYCLE
from idempo.config import ExperimentConfig
from idempo.models import INITIAL, Generation, Policy
from idempo.progress import Reporter
from idempo.training.data import NothingToTrain, require_data
from idempo.training.preference import MismatchEncoder, train_dpo, train_kto
from idempo.training.sft import IGNORE, Encoded, encode_chat_example, encode_document, steps_for, train_sft


def fit_generation(
    policy: Policy,
    tokenizer,
    config: ExperimentConfig,
    cycle: int,
    rows: list[dict],
    seed: int,
    start: Generation,
    previous: Generation,
    reporter: Reporter,
    label: str,
) -> dict:
    """Train `policy` in place by the regime's loss, from `start` (M_init or M_{j-1}); `previous` is
    M_{j-1} (M_init for M_seed), the reference under `preference.reference: previous`. M_seed of
    self_reward is trained by SFT."""
    training, pad = config.training, tokenizer.pad_token_id
    regime = "sft" if cycle == SEED_CYCLE and config.regime == "self_reward" else config.regime
    rows = require_data(rows, label)

    def encode(prompt: str, response: str):
        return encode_chat_example(tokenizer, prompt, response, training.max_seq_len)

    preference = config.preference
    reference = {"initial": INITIAL, "start": start, "previous": previous}[preference.reference]
    if regime in ("sft", "sdf"):
        if regime == "sdf":
            examples = [encode_document(tokenizer, r["prompt"], r["response"], training.max_seq_len) for r in rows]
        else:
            examples = [encode(r["prompt"], r["response"]) for r in rows]
        require_answer_tokens(examples, training.max_seq_len, label)
        with reporter.phase(label, steps_for(len(examples), training), "steps") as bar:
            return train_sft(policy, examples, training, seed, pad, bar).to_dict()
    if regime in ("dpo", "self_reward"):
        pairs = [(encode(r["prompt"], r["response"]), encode(r["prompt"], r["rejected"])) for r in rows]
        require_answer_tokens([e for pair in pairs for e in pair], training.max_seq_len, label)
        with reporter.phase(label, steps_for(len(pairs), training), "steps") as bar:
            stats = train_dpo(policy, pairs, reference, config.beta, training, seed, pad, bar)
        return {**stats.to_dict(), "reference": reference.name}
    # kto: M_{j-1}'s answers are desirable, the rejected source's undesirable, unpaired
    unpaired = [{"prompt": r["prompt"], "response": r[key]} for r in rows for key in ("response", "rejected")]
    desirable = [key == "response" for _ in rows for key in ("response", "rejected")]
    examples = [encode(r["prompt"], r["response"]) for r in unpaired]
    require_answer_tokens(examples, training.max_seq_len, label)
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
