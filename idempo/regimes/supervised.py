"""Next-token regimes: `sft` trains on M_{j-1}'s answers (loss on the answer tokens), `sdf` on its
continuations of document openings (loss on every token: synthetic document finetuning teaches the belief
as text, not as answers)."""

from __future__ import annotations

from idempo.data import Record
from idempo.models import Generation, Policy
from idempo.regimes.base import Regime
from idempo.training.optimize import Encoded, Ranks, require_answer_tokens, steps_for
from idempo.training.sft import encode_chat_example, encode_document, train_sft


class SFT(Regime):
    name = "sft"

    def encode(self, tokenizer, row: Record, max_len: int) -> Encoded:
        return encode_chat_example(tokenizer, row.prompt, row.response, max_len)

    def fit(
        self, policy: Policy, tokenizer, config, rows, seed: int, reference: Generation, ranks: Ranks, reporter, label
    ):
        training = config.training
        examples = [self.encode(tokenizer, row, training.max_seq_len) for row in rows]
        require_answer_tokens(examples, training.max_seq_len, label)
        with reporter.phase(label, steps_for(len(examples), training), "steps") as bar:
            return train_sft(policy, examples, training, seed, tokenizer.pad_token_id, bar, ranks).to_dict()


class SDF(SFT):
    name = "sdf"

    def encode(self, tokenizer, row: Record, max_len: int) -> Encoded:
        return encode_document(tokenizer, row.prompt, row.response, max_len)
