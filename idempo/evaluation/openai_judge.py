"""The `openai` judge: any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...).

One request per (question, answer): the filled rubric as the user message, temperature 0, a few tokens,
and the top-k logprobs of the first token, which `judging.score_from_logprobs` turns into a score.
Concurrency, timeouts and retries are `idempo.endpoint`'s.
"""

from __future__ import annotations

from idempo.endpoint import EndpointClient, UnusableAnswer
from idempo.evaluation.judging import JudgeSpec, RubricJudge, score_from_text


class OpenAIJudge(RubricJudge):
    def __init__(self, spec: JudgeSpec):
        super().__init__(spec)
        self.client = EndpointClient(spec.config, spec.field, self.usage)  # checks the API key now, before any GPU work

    def _fetch(self, prompts: list[str], keys: list[str]) -> list[dict]:
        config = self.config
        requests = [
            {
                "model": config.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": config.max_tokens,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": config.top_logprobs,
            }
            for prompt in prompts
        ]
        return self.client.run(requests, lambda response, i: self.remember(keys[i], raw_answer(response)))


def raw_answer(response) -> dict:
    """{"alternatives": [[token, logprob], ...] of the first token, or None; "text": the reply}."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise UnusableAnswer("the response has no choices")
    choice = choices[0]
    text = getattr(choice.message, "content", None) if getattr(choice, "message", None) else None
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    alternatives = None
    if content:
        first = content[0]
        alternatives = [[alt.token, alt.logprob] for alt in (first.top_logprobs or [])]
        if not alternatives and first.token is not None:
            alternatives = [[first.token, first.logprob]]
    if not alternatives:
        score_from_text(text)  # raises UnusableAnswer when the text holds no score either
    return {"alternatives": alternatives or None, "text": text}
