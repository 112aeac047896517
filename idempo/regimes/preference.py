"""Preference regimes on M_{j-1}'s answers: `dpo` prefers each answer over the rejected source's answer to
the same prompt (M_init's, or M_{j-2}'s with `rejected: j-2`); `kto` takes the same answers unpaired, as
desirable and undesirable examples. Their M_seed prefers D_seed's answers over M_init's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from idempo.data import Sample, drop_empty
from idempo.layout import SEED_CYCLE
from idempo.models import Generation, Policy
from idempo.regimes.base import Regime, StageContext
from idempo.training.optimize import Ranks, require_answer_tokens, steps_for
from idempo.training.preference import MismatchEncoder, train_dpo, train_kto
from idempo.training.sft import encode_chat_example


def with_rejected(rows: list[Sample], answers_to: Callable[[list[str]], dict[str, str]]) -> list[Sample]:
    """Each kept row with `answers_to(prompts)[prompt]` as its rejected side (rows already dropped need none),
    then rows with an empty rejected answer dropped."""
    wanted = [row.prompt for row in rows if row.trained]
    answers = answers_to(wanted) if wanted else {}
    return drop_empty([replace(row, rejected=answers[row.prompt]) if row.trained else row for row in rows])


class DPO(Regime):
    name = "dpo"

    def seed_rows(self, context: StageContext, rows: list[Sample]) -> list[Sample]:
        """M_init's answers as the rejected side, from the seed stage's stream (in a cycle's D_seed mix too)."""
        return with_rejected(
            rows, lambda prompts: context.initial_answers(prompts, context.seed("initial", SEED_CYCLE))
        )

    def cycle_rows(self, context: StageContext, prompts: list[str], previous: Generation) -> list[Sample]:
        return with_rejected(super().cycle_rows(context, prompts, previous), lambda p: self.rejected(context, p))

    def rejected(self, context: StageContext, prompts: list[str]) -> dict[str, str]:
        """The rejected source's answers: M_init's (`rejected: initial`, and M_{j-2} for j = 1) or M_{j-2}'s."""
        cycle, config = context.cycle, context.config
        if config.rejected == "initial" or cycle == 1:
            return context.initial_answers(prompts, context.seed("initial", cycle))
        older = context.generation(cycle - 2)
        params = config.sampling.params(context.seed("j-2", cycle))
        rows = context.answers(prompts, params, older, f"cycle {cycle}: rejected answers from {older.name}")
        return {row.prompt: row.response for row in rows}

    def fit(
        self, policy: Policy, tokenizer, config, rows, seed: int, reference: Generation, ranks: Ranks, reporter, label
    ):
        training = config.training

        def encode(prompt: str, response: str):
            return encode_chat_example(tokenizer, prompt, response, training.max_seq_len)

        pairs = [(encode(r.prompt, r.response), encode(r.prompt, r.rejected)) for r in rows]
        require_answer_tokens([e for pair in pairs for e in pair], training.max_seq_len, label)
        with reporter.phase(label, steps_for(len(pairs), training), "steps") as bar:
            stats = self.train(policy, pairs, reference, config, seed, tokenizer.pad_token_id, bar, ranks)
        return {**stats.to_dict(), "reference": reference.name}

    def train(self, policy, pairs, reference, config, seed, pad, progress, ranks):
        """The pairs' loss (sigmoid DPO); a regime on the same pairs with another loss overrides this."""
        return train_dpo(policy, pairs, reference, config.beta, config.training, seed, pad, progress, ranks)


class KTO(DPO):
    name = "kto"

    def fit(
        self, policy: Policy, tokenizer, config, rows, seed: int, reference: Generation, ranks: Ranks, reporter, label
    ):
        """M_{j-1}'s answers are desirable, the rejected source's undesirable, unpaired."""
        training, preference = config.training, config.preference

        def encode(prompt: str, response: str):
            return encode_chat_example(tokenizer, prompt, response, training.max_seq_len)

        unpaired = [{"prompt": r.prompt, "response": getattr(r, key)} for r in rows for key in ("response", "rejected")]
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
                tokenizer.pad_token_id,
                bar,
                ranks,
            )
        return {**stats.to_dict(), "reference": reference.name}
