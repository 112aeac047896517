"""The `openai` judge: any OpenAI-compatible endpoint (OpenAI, a vLLM server, ...).

How numbers are read depends on the endpoint, found out once per judge: OpenAI's own API, from the
first token's top-k logprobs (its tokenizers write every number 0..100 as one token); a vLLM server (it
answers `/tokenize`), over whole numbers on any tokenizer, with one `/v1/completions` request per judged
item holding a prompt per node of the number trie; any other server, from the first token until a reply
shows the tokenizer splits numbers, which stops the judge rather than score the first digit.
docs/metrics.md, "Trait score and coherence". Concurrency, timeouts and retries are `idempo.endpoint`'s.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field

from idempo.endpoint import Calls, EndpointClient, EndpointError, UnusableAnswer, describe, endpoint_url
from idempo.evaluation.judging import (
    JudgeSpec,
    RubricJudge,
    numbers_answer,
    score_from_text,
    unclosed_reasoning_answer,
)
from idempo.evaluation.numbers import (
    ANCHOR,
    SPELLINGS,
    Path,
    continues_number,
    distinct_paths,
    path_after_anchor,
    spelling_probabilities,
    text_after_anchor,
    trie_nodes,
)
from idempo.evaluation.reasoning import (
    CLOSE,
    OPEN,
    PROBE,
    TEMPLATE_SETTINGS,
    WHITESPACE_AFTER_CLOSE,
    closes_reasoning,
    is_whitespace,
    leaves_reasoning_open,
)
from idempo.redaction import redact

_MULTI_DIGIT = re.compile(r"^\d{2,3}$")
_TOKEN_ID = "token_id:"
TEMPERATURE = 0.0  # every request reads the judge's distribution, none samples from it


@dataclass
class VLLMNumbers:
    """What a vLLM server's tokenizer and chat template do, found out once per judge."""

    paths: dict[str, Path]
    nodes: list[Path]
    anchor_ids: list[int]
    anchor_text: str
    thinking: bool  # the generation prompt leaves a reasoning block open
    texts: dict[int, str] = field(default_factory=dict)  # token id -> its own text, as looked up


class OpenAIJudge(RubricJudge):
    def __init__(self, spec: JudgeSpec):
        super().__init__(spec)
        self.client = EndpointClient(spec.config, spec.field, self.usage)  # checks the API key now, before any GPU work
        self._vllm: VLLMNumbers | bool | None = None  # None: not asked yet; False: not a vLLM server

    def _answer_settings(self) -> dict:
        c = self.config
        settings = {
            "endpoint": endpoint_url(c.base_url),
            "temperature": TEMPERATURE,
            "max_tokens": c.max_tokens,
            "top_logprobs": c.top_logprobs,
        }
        if c.base_url is not None:  # it may be a vLLM server: whole numbers, after reasoning up to the budget
            settings.update(max_reasoning_tokens=c.max_reasoning_tokens, template=dict(TEMPLATE_SETTINGS))
        return settings

    def _fetch(self, prompts: list[str], keys: list[str]) -> list[dict]:
        if not prompts:
            return []
        if self.config.base_url is not None and self._vllm is None:
            self._vllm = self.client.run_jobs(1, lambda calls, _: self._ask_server(calls))[0] or False
        if isinstance(self._vllm, VLLMNumbers):
            return self._fetch_whole_numbers(prompts, keys, self._vllm)
        return self._fetch_first_tokens(prompts, keys)

    # -- first token (OpenAI's API, other servers) ------------------------------------------------------

    def _fetch_first_tokens(self, prompts: list[str], keys: list[str]) -> list[dict]:
        config = self.config
        requests = [
            {
                "model": config.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": config.max_tokens,
                "temperature": TEMPERATURE,
                "logprobs": True,
                "top_logprobs": config.top_logprobs,
            }
            for prompt in prompts
        ]

        def parse(response, index: int) -> dict:
            raw = raw_answer(response, self.client.secrets)
            problem = first_token_problem(response)
            if problem:
                raise EndpointError(f"{describe(self.config, self.spec.field)}: {problem}")
            return self.remember(keys[index], raw)

        return self.client.run(requests, parse)

    # -- whole numbers (vLLM) ---------------------------------------------------------------------------

    async def _ask_server(self, calls: Calls) -> VLLMNumbers | None:
        """The server's tokenizer facts if it is a vLLM server, else None."""
        probe = await calls.post("/tokenize", self._chat_tokenize_body(PROBE), _vllm_tokens, absent_ok=True)
        if probe is None:
            return None
        spelled = await asyncio.gather(*(self._tokenize(calls, ANCHOR + s) for s in SPELLINGS))
        anchor_ids = await self._tokenize(calls, ANCHOR)
        paths: dict[str, Path] = {}
        for spelling, anchored in zip(SPELLINGS, spelled, strict=True):
            paths[spelling] = path_after_anchor(anchor_ids, anchored) or tuple(await self._tokenize(calls, spelling))
        paths = distinct_paths(paths)
        anchor_text = await self._detokenize(calls, anchor_ids)
        rendered = await self._detokenize(calls, probe)  # special tokens kept: a <think> token shows
        return VLLMNumbers(paths, trie_nodes(paths.values()), anchor_ids, anchor_text, leaves_reasoning_open(rendered))

    def _chat_tokenize_body(self, prompt: str) -> dict:
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "add_generation_prompt": True,
            "chat_template_kwargs": dict(TEMPLATE_SETTINGS),
        }

    async def _tokenize(self, calls: Calls, text: str) -> list[int]:
        body = {"model": self.config.model, "prompt": text, "add_special_tokens": False}
        return await calls.post("/tokenize", body, _tokens)

    async def _detokenize(self, calls: Calls, ids: list[int]) -> str:
        return await calls.post("/detokenize", {"model": self.config.model, "tokens": ids}, _detokenized)

    def _fetch_whole_numbers(self, prompts: list[str], keys: list[str], server: VLLMNumbers) -> list[dict]:
        pending: dict[int, asyncio.Task] = {}  # token texts being looked up in this run

        async def texts_of(calls: Calls, ids) -> dict[int, str]:
            for token in set(ids) - server.texts.keys() - pending.keys():
                pending[token] = asyncio.ensure_future(self._token_text(calls, server, token))
            for token in set(ids) - server.texts.keys():
                server.texts[token] = await pending[token]
            return server.texts

        where = describe(self.config, self.spec.field)

        async def judge(calls: Calls, index: int) -> dict:
            ids = await calls.post("/tokenize", self._chat_tokenize_body(prompts[index]), _tokens)
            reasoning, closed = None, None
            if server.thinking:
                written, closed = await self._reason(calls, ids, lambda tokens: texts_of(calls, tokens))
                reasoning = self.client.redact(await self._detokenize(calls, written)) if written else ""
                if not closed:
                    return self.remember(keys[index], unclosed_reasoning_answer(reasoning))
                ids = ids + written
            request = self._node_request(ids, server.nodes)
            readings = await calls.completion(request, lambda response: node_readings(response, server.nodes, where))
            ends_at = set(server.paths.values())
            texts = await texts_of(calls, [t for node in ends_at for t in readings[node]])
            ends = {
                node: sum(math.exp(lp) for t, lp in readings[node].items() if not continues_number(texts[t]))
                for node in ends_at
            }
            probabilities = spelling_probabilities(server.paths, readings, ends)
            return self.remember(keys[index], numbers_answer(probabilities, reasoning, closed))

        return self.client.run_jobs(len(prompts), judge)

    def _node_request(self, ids: list[int], nodes: list[Path]) -> dict:
        """One completion per trie node: the judge prompt, then the node's tokens; one token each."""
        return {
            "model": self.config.model,
            "prompt": [ids + list(node) for node in nodes],
            "max_tokens": 1,
            "temperature": TEMPERATURE,
            "logprobs": self.config.top_logprobs,
            "extra_body": {"return_tokens_as_token_ids": True},
        }

    async def _token_text(self, calls: Calls, server: VLLMNumbers, token: int) -> str:
        anchored = await self._detokenize(calls, [*server.anchor_ids, token])
        alone = await self._detokenize(calls, [token]) if not anchored.startswith(server.anchor_text) else ""
        return text_after_anchor(anchored, server.anchor_text, alone)

    async def _reason(self, calls: Calls, ids: list[int], texts_of) -> tuple[list[int], bool]:
        """Greedy reasoning up to `max_reasoning_tokens`, stopped at the closing tag, then the whitespace
        the judge writes after it: (the tokens, whether the reasoning closed)."""
        request = {
            "model": self.config.model,
            "prompt": ids,
            "max_tokens": self.config.max_reasoning_tokens,
            "temperature": TEMPERATURE,
            "stop": [CLOSE],
            "extra_body": {"include_stop_str_in_output": True, "skip_special_tokens": False, "return_token_ids": True},
        }
        where = describe(self.config, self.spec.field)
        text, written = await calls.completion(request, lambda response: _generated(response, where))
        if not closes_reasoning(text):
            return written, False
        tail = {**request, "prompt": ids + written, "max_tokens": WHITESPACE_AFTER_CLOSE}
        del tail["stop"]
        _, after = await calls.completion(tail, lambda response: _generated(response, where))
        texts = await texts_of(after)
        for token in after:
            if not is_whitespace(texts[token]):
                break
            written = written + [token]
        return written, True


def _vllm_tokens(body) -> list[int] | None:
    """The ids of vLLM's /tokenize answer {"count", "max_model_len", "tokens", ...}; None for another
    server's answer to the same path."""
    if not isinstance(body, dict) or not isinstance(body.get("tokens"), list) or "max_model_len" not in body:
        return None
    return [int(t) for t in body["tokens"]]


def _tokens(body) -> list[int]:
    ids = _vllm_tokens(body)
    if ids is None:
        raise UnusableAnswer(f"/tokenize answered {str(body)[:80]!r}, not vLLM's {{'tokens': [...], ...}}")
    return ids


def _detokenized(body) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise UnusableAnswer(f"/detokenize answered {str(body)[:80]!r}, not {{'prompt': text}}")
    return body["prompt"]


def _generated(response, where: str) -> tuple[str, list[int]]:
    """(text, token ids) of a one-prompt completion with `return_token_ids`."""
    choice = _choices(response, 1)[0]
    token_ids = getattr(choice, "token_ids", None)
    if token_ids is None:
        raise EndpointError(f"{where}: the completion has no token_ids, which vLLM returns with return_token_ids")
    return choice.text or "", [int(t) for t in token_ids]


def node_readings(response, nodes: list[Path], where: str) -> dict[Path, dict[int, float]]:
    """The next token's top-k {token id: logprob} after each node, from a node request's choices (one
    per prompt, in prompt order; tokens as 'token_id:N')."""
    readings = {}
    for node, choice in zip(nodes, _choices(response, len(nodes)), strict=True):
        top = getattr(getattr(choice, "logprobs", None), "top_logprobs", None)
        if not top or top[0] is None:
            raise UnusableAnswer("the completion has no top_logprobs")
        reading = {}
        for token, logprob in top[0].items():
            if not token.startswith(_TOKEN_ID):
                raise EndpointError(
                    f"{where}: the completion names its tokens as text ({token!r}), not as ids: the server ignored "
                    "return_tokens_as_token_ids, so it is not the vLLM server idempo reads whole numbers with"
                )
            reading[int(token[len(_TOKEN_ID) :])] = logprob
        readings[node] = reading
    return readings


def _choices(response, count: int) -> list:
    choices = sorted(getattr(response, "choices", None) or [], key=lambda c: c.index)
    if len(choices) != count:
        raise UnusableAnswer(f"the completion has {len(choices)} choices for {count} prompts")
    return choices


def raw_answer(response, secrets: tuple[str, ...] = ()) -> dict:
    """{"alternatives": [[token, logprob], ...] of the first token, or None; "text": the reply, redacted
    (a server that quotes the request must not put its key in the cache or a number in the text)}."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise UnusableAnswer("the response has no choices")
    choice = choices[0]
    text = getattr(choice.message, "content", None) if getattr(choice, "message", None) else None
    text = redact(text, secrets) if text else text
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    alternatives = None
    if content:
        first = content[0]
        alternatives = [[alt.token, alt.logprob] for alt in (first.top_logprobs or [])]
        if not alternatives and first.token is not None:
            alternatives = [[first.token, first.logprob]]
    if not alternatives and not (text or "").lstrip().startswith(OPEN):
        score_from_text(text)  # raises UnusableAnswer when the text holds no score either
    return {"alternatives": alternatives or None, "text": text}


def first_token_problem(response) -> str | None:
    """Why a chat reply cannot be scored from its first token, if it shows why: the tokenizer wrote a
    multi-digit number as several tokens, or the judge reasons before it answers."""
    choice = response.choices[0]
    text = (getattr(choice.message, "content", None) or "").strip()
    if text.startswith(OPEN):
        return (
            f"the judge writes a reasoning block ({OPEN}...) before its number, so its first token is no "
            "number; serve it with vLLM (idempo then turns thinking off or reads the number after the "
            "reasoning) or use the hf backend"
        )
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    first = (content[0].token or "").strip() if content else None
    if first is not None and _MULTI_DIGIT.match(text) and first != text and text.startswith(first) and first.isdigit():
        return (
            f"the judge's tokenizer writes numbers as several tokens (it answered {text!r}, whose first token "
            f"is {first!r}), and this endpoint offers no /tokenize to read whole numbers with: its first-token "
            "logprobs would score the first digit only. Serve the judge with vLLM, use the hf backend, or an "
            "endpoint that returns no logprobs (the number is then read from the text)"
        )
    return None
