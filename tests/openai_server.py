"""A real HTTP server on loopback that speaks the OpenAI chat-completions protocol.

It stands in for a paid judge or teacher at the network boundary only: idempo's own client, retries,
cache and parsing all run for real against it. Tests script failures (`fail_next`) and choose how it
answers (`answer`), and read what it received (`requests`).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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


class FakeOpenAI:
    """`with FakeOpenAI() as server:` ... `server.base_url` ... `server.requests`."""

    def __init__(self, answer=lucky_judge, logprobs: bool = True):
        self.answer = answer  # request -> {"text", "alternatives"} (or {"content"} for free text)
        self.logprobs = logprobs
        self.requests: list[dict] = []
        self.failures: list[str] = []  # consumed one per request: '429', '500', '401', 'slow', 'badjson', 'text:..'
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def fail_next(self, *failures: str) -> None:
        with self.lock:
            self.failures.extend(failures)

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
                with fake.lock:
                    fake.requests.append(body)
                    failure = fake.failures.pop(0) if fake.failures else None
                if failure == "429":
                    return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"})
                if failure in ("500", "401"):
                    return self._send(int(failure), {"error": {"message": f"scripted {failure}"}})
                if failure == "slow":
                    time.sleep(2.0)
                if failure == "badjson":
                    return self._send_raw(200, b'{"id": "x", "choices": [', "application/json")
                if failure and failure.startswith("text:"):
                    return self._send(200, _completion(body, failure[5:], None))
                reply = fake.answer(body)
                if "content" in reply:
                    return self._send(200, _completion(body, reply["content"], None))
                alternatives = judge_alternatives(reply["alternatives"]) if fake.logprobs else None
                return self._send(200, _completion(body, reply["text"], alternatives))

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
