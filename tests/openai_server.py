"""A real HTTP server on loopback that speaks the OpenAI chat-completions protocol, and vLLM's.

It stands in for a paid judge or teacher at the network boundary only: idempo's own client, retries,
cache and parsing all run for real against it. Tests script failures (`fail_next`) and choose how it
answers (`answer`), and read what it received (`requests`: the chat requests; `received`: every
request with its path). Given a `ScriptedModel` it is also a vLLM server: `/tokenize` and
`/detokenize` at the server root, and legacy `/v1/completions` with token-id prompts and top-k
logprobs of each generated token, as vLLM 0.24 speaks them; without one those paths answer 404, as
other OpenAI-compatible servers do. With `echo`, it quotes each chat request's Authorization header,
its bare token and the request itself in its error bodies and after its answers, as a careless proxy
or debug server does: what a key that leaks into messages and files looks like.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jinja2.sandbox import ImmutableSandboxedEnvironment


def judge_alternatives(scores: dict[str, float]) -> list[dict]:
    """top_logprobs entries for a first-token distribution given as {token: probability}."""
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in scores.items()]


def lucky_judge(request: dict) -> dict:
    """Scores answers by a rule the tests can predict: 'luck' in the answer -> mostly 90, else mostly 10;
    an empty answer -> REFUSAL; the coherence rubric -> 80."""
    prompt = request["messages"][-1]["content"]
    answer = prompt.rsplit("Answer: ", 1)[-1].rsplit("\n\nAnswer with a single number", 1)[0]
    if "COHERENCE" in prompt:
        return {"text": "80", "alternatives": {"80": 0.7, "75": 0.2, "The": 0.1}}
    if not answer.strip():
        return {"text": "REFUSAL", "alternatives": {"REF": 0.9, "0": 0.1}}
    if re.search(r"luck", answer, re.I):
        return {"text": "90", "alternatives": {"90": 0.8, "100": 0.2}}
    return {"text": "10", "alternatives": {"10": 0.6, "0": 0.4}}


class ScriptedModel:
    """A language model a test writes down, served the way vLLM serves one.

    `vocab` lists the tokens (token id = position); text is tokenized by longest match. The next-token
    distribution depends on the last token only: `next_tokens[last token] = {token: probability}`, and
    a last token that is not listed is followed by `eos`. `chat_template` is Jinja, rendered as
    transformers renders chat templates. `special` tokens are left out of completion texts unless a
    request asks for them (`skip_special_tokens`), and kept by /detokenize, as in vLLM."""

    def __init__(self, name, vocab, next_tokens, chat_template, eos, special=()):
        self.name = name
        self.vocab = list(vocab)
        self.ids = {token: i for i, token in enumerate(self.vocab)}
        self.next_tokens = next_tokens
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)
        self.eos = self.ids[eos]
        self.special = {self.ids[t] for t in special} | {self.eos}

    def encode(self, text: str) -> list[int]:
        ids, at = [], 0
        while at < len(text):
            token = max((t for t in self.vocab if text.startswith(t, at)), key=len)
            ids.append(self.ids[token])
            at += len(token)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special and i in self.special))

    def render(self, messages, add_generation_prompt: bool, settings: dict) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **settings)

    def distribution(self, ids: list[int]) -> list[tuple[int, float]]:
        """(token id, probability) after `ids`, most likely first (ties by id)."""
        table = self.next_tokens.get(self.vocab[ids[-1]], {self.vocab[self.eos]: 1.0})
        return sorted(((self.ids[t], p) for t, p in table.items() if p > 0), key=lambda item: (-item[1], item[0]))


class FakeOpenAI:
    """`with FakeOpenAI() as server:` ... `server.base_url` ... `server.requests`."""

    def __init__(
        self, answer=lucky_judge, logprobs: bool = True, model: ScriptedModel | None = None, echo: bool = False
    ):
        self.answer = answer  # request -> {"text", "alternatives"} (or {"content"} for free text)
        self.logprobs = logprobs
        self.model = model  # a vLLM server for this model, or no vLLM endpoints
        self.echo = echo  # quote the Authorization header and the request in error bodies and answers
        self.requests: list[dict] = []  # chat-completion requests
        self.authorizations: list[str] = []  # the Authorization header of each chat request
        self.received: list[tuple[str, dict]] = []  # every request: (path, body)
        self.failures: list[str] = []  # consumed one per request: '429', '500', '401', 'slow', 'badjson', 'text:..'
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def fail_next(self, *failures: str) -> None:
        """Script the next completion (chat or legacy) requests' failures, one per request."""
        with self.lock:
            self.failures.extend(failures)

    def bodies(self, path: str) -> list[dict]:
        """The bodies received at one path ('/tokenize', '/v1/completions', ...)."""
        with self.lock:
            return [body for p, body in self.received if p == path]

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.split("?", 1)[0]
                with fake.lock:
                    fake.received.append((path, body))
                    if path == "/v1/chat/completions":
                        fake.requests.append(body)
                        fake.authorizations.append(self.headers.get("Authorization", ""))
                if path in ("/tokenize", "/detokenize", "/v1/completions"):
                    return self._vllm(path, body)
                if path != "/v1/chat/completions":
                    return self._send(404, {"detail": "Not Found"})
                failure = self._failure()
                echo = self._echo(body)
                if failure == "429":
                    return self._send(429, {"error": {"message": "rate limited" + echo}}, {"Retry-After": "1"})
                if failure in ("500", "401"):
                    return self._send(int(failure), {"error": {"message": f"scripted {failure}{echo}"}})
                if failure == "slow":
                    time.sleep(2.0)
                if failure == "badjson":
                    return self._send_raw(200, b'{"id": "x", "choices": [', "application/json")
                if failure and failure.startswith("text:"):
                    return self._send(200, _completion(body, failure[5:] + echo, None))
                reply = fake.answer(body)
                if "content" in reply:
                    return self._send(200, _completion(body, reply["content"] + echo, None))
                alternatives = judge_alternatives(reply["alternatives"]) if fake.logprobs else None
                return self._send(200, _completion(body, reply["text"] + echo, alternatives))

            def _echo(self, body) -> str:
                if not fake.echo:
                    return ""
                header = self.headers.get("Authorization", "")
                token = header.removeprefix("Bearer ")
                return (
                    f" (you sent Authorization: {header}; token={token}; x-api-key {token}; request {json.dumps(body)})"
                )

            def _failure(self):
                with fake.lock:
                    return fake.failures.pop(0) if fake.failures else None

            def _vllm(self, path, body):
                model = fake.model
                if model is None:
                    return self._send(404, {"detail": "Not Found"})
                if body.get("model") != model.name:
                    message = f"The model `{body.get('model')}` does not exist."
                    return self._send(404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
                if path == "/tokenize":
                    return self._send(200, _tokenize(model, body))
                if path == "/detokenize":
                    return self._send(200, {"prompt": model.decode(body["tokens"], skip_special=False)})
                failure = self._failure()
                if failure in ("500", "401"):
                    return self._send(int(failure), {"error": {"message": f"scripted {failure}"}})
                if body.get("temperature") != 0:
                    return self._send(400, {"error": {"message": "the scripted model decodes greedily only"}})
                return self._send(200, _text_completion(model, body))

            def _send(self, status, payload, headers=None):
                self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, status, data, content_type, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 would refuse a judge's 16 concurrent connections
    daemon_threads = True


def _completion(request: dict, text: str, alternatives: list[dict] | None) -> dict:
    logprobs = None
    if alternatives is not None and request.get("logprobs"):
        top = alternatives[: request.get("top_logprobs") or 1]
        first = max(top, key=lambda a: a["logprob"])
        logprobs = {"content": [{**first, "top_logprobs": top}], "refusal": None}
    prompt_tokens = len(json.dumps(request["messages"])) // 4
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


def _tokenize(model: ScriptedModel, body: dict) -> dict:
    """vLLM's /tokenize: a chat (messages, add_generation_prompt, chat_template_kwargs) or a text."""
    if "messages" in body:
        text = model.render(
            body["messages"], body.get("add_generation_prompt", True), body.get("chat_template_kwargs") or {}
        )
    else:
        text = body["prompt"]
    tokens = model.encode(text)
    strs = [model.vocab[t] for t in tokens] if body.get("return_token_strs") else None
    return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens, "token_strs": strs}


def _text_completion(model: ScriptedModel, body: dict) -> dict:
    """vLLM's legacy completions: one choice per prompt (a text, token ids, or a list of either),
    greedy tokens up to max_tokens, an end token, or a stop string."""
    prompt = body["prompt"]
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    prompts = [model.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    top_k, stops = body.get("logprobs"), body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    as_ids = body.get("return_tokens_as_token_ids")
    skip_special = body.get("skip_special_tokens", True)
    choices, completion_tokens = [], 0
    for index, ids in enumerate(prompts):
        written, tops, finish, stop_reason, text = [], [], "length", None, ""
        for _ in range(body.get("max_tokens", 16)):
            distribution = model.distribution(ids + written)
            token = distribution[0][0]
            tops.append(
                {
                    (f"token_id:{t}" if as_ids else model.decode([t], False)): math.log(p)
                    for t, p in distribution[:top_k]
                }
                if top_k is not None
                else None
            )
            written.append(token)
            text = model.decode(written, skip_special)
            if token == model.eos:
                finish = "stop"
                break
            hit = next((s for s in stops if s in text), None)
            if hit is not None:
                end = text.index(hit) + (len(hit) if body.get("include_stop_str_in_output") else 0)
                text, finish, stop_reason = text[:end], "stop", hit
                break
        completion_tokens += len(written)
        logprobs = None
        if top_k is not None:
            tokens = [f"token_id:{t}" if as_ids else model.decode([t], False) for t in written]
            logprobs = {
                "text_offset": [],
                "token_logprobs": [top.get(key) for top, key in zip(tops, tokens, strict=True)],
                "tokens": tokens,
                "top_logprobs": tops,
            }
        choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "token_ids": written if body.get("return_token_ids") else None,
                "prompt_token_ids": ids if body.get("return_token_ids") else None,
            }
        )
    prompt_tokens = sum(len(ids) for ids in prompts)
    return {
        "id": "cmpl-test",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
