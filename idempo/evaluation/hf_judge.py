"""The `hf` judge: a local Hugging Face model scores answers with the same aggregation as `openai`.

The filled rubric goes through the judge's chat template; one forward pass gives the first answer
token's distribution, whose top-k alternatives (decoded to text) feed `score_from_logprobs` exactly as
an endpoint's logprobs would. Batched with left padding; no sampling, so it is deterministic.
"""

from __future__ import annotations

import torch

from idempo.evaluation.judging import JudgeSpec, RubricJudge
from idempo.models import load_base_model, load_tokenizer


class HFJudge(RubricJudge):
    def __init__(self, spec: JudgeSpec):
        super().__init__(spec)
        self.tokenizer = load_tokenizer(spec.config.model, spec.loading)
        self._model = None  # loaded on first use: a fully cached evaluation never loads it

    @property
    def model(self):
        if self._model is None:
            self._model = load_base_model(self.spec.config.model, self.spec.loading)
        return self._model

    def _fetch(self, prompts: list[str], keys: list[str]) -> list[dict]:
        raws = []
        for start in range(0, len(prompts), self.config.batch_size):
            batch = self._fetch_batch(prompts[start : start + self.config.batch_size])
            raws += [self.remember(k, raw) for k, raw in zip(keys[start:], batch, strict=False)]
        return raws

    @torch.inference_mode()
    def _fetch_batch(self, prompts: list[str]) -> list[dict]:
        tokenizer = self.tokenizer
        ids = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            for p in prompts
        ]
        width = max(len(i) for i in ids)
        pad = tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
        attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits[:, -1].float()
        top = torch.log_softmax(logits, dim=-1).topk(self.config.top_logprobs, dim=-1)
        raws = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            alternatives = [[tokenizer.decode([i]), lp] for i, lp in zip(indices, values, strict=True)]
            raws.append({"alternatives": alternatives, "text": alternatives[0][0]})
        return raws
