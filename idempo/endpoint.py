"""Calls to an OpenAI-compatible chat endpoint that survive a busy or flaky server.

Judges and the teacher send many small requests. Each goes through `EndpointClient.chat`:
- at most `concurrency` in flight;
- a per-request timeout;
- retries on 429, 5xx, timeouts, connection errors and unusable answers (a body that is not JSON, or
  a reply the caller's `parse` rejects). The wait honours Retry-After, else it is exponential backoff
  with full jitter;
- other errors (400, 401, 404, ...) fail at once, because retrying cannot fix them.
When the retries run out, `EndpointError` says what was asked and what went wrong last. A judge never
turns a failure into a score.

Judges of a vLLM server also call its completions endpoint (token-id prompts) and its `/tokenize` and
`/detokenize` endpoints (at the server root, not under /v1): `EndpointClient.run_jobs` gives each job
a `Calls` whose every request goes through the same slots and retries.

The openai client's own retries are off (`max_retries=0`), so this module is the only retry policy and
its counts in `Usage` are exact.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from idempo.config import ConfigError, EndpointConfig

T = TypeVar("T")
log = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """A request that could not be completed, even after retries."""


class UnusableAnswer(ValueError):
    """The endpoint answered, but not in a form the caller can use (retried like a server error)."""


@dataclass
class Usage:
    """What the endpoint was asked, for one phase; `cost_usd` needs the config's prices."""

    requests: int = 0  # HTTP requests sent, retries and tokenizer look-ups included
    retries: int = 0
    cached: int = 0  # answered from the on-disk cache, no request sent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None

    def add_tokens(self, usage: Any, config: EndpointConfig) -> None:
        if usage is None:
            return
        self.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
        self.completion_tokens += getattr(usage, "completion_tokens", 0) or 0
        if config.price_input_per_mtok is not None and config.price_output_per_mtok is not None:
            self.cost_usd = (
                self.prompt_tokens * config.price_input_per_mtok + self.completion_tokens * config.price_output_per_mtok
            ) / 1e6

    def take(self) -> dict:
        """The counts so far, then zero them (one phase's worth per call)."""
        counts = asdict(self)
        self.__init__()
        return counts


def api_key(config: EndpointConfig, field: str) -> str:
    """The key from the environment variable the config names. OpenAI itself needs one; a self-hosted
    server usually does not, so a missing key is only an error without a `base_url`."""
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    if config.base_url is None:
        raise ConfigError(
            [f"{field}.api_key_env: environment variable {config.api_key_env} is not set (the OpenAI API needs a key)"]
        )
    return "EMPTY"


class EndpointClient:
    """One endpoint, for one batch of requests at a time (`run`), with usage counted in `usage`."""

    def __init__(self, config: EndpointConfig, field: str, usage: Usage | None = None):
        self.config = config
        self.field = field
        self.key = api_key(config, field)
        self.usage = usage if usage is not None else Usage()

    def run(self, requests: list[dict], parse: Callable[[Any, int], T]) -> list[T]:
        """Send chat requests (kwargs of `chat.completions.create`), return `parse(response, index)` for
        each. `parse` raises `UnusableAnswer` for a reply worth asking again."""

        async def job(calls: Calls, index: int) -> T:
            return await calls.chat(requests[index], lambda response: parse(response, index))

        return self.run_jobs(len(requests), job)

    def run_jobs(self, count: int, job: Callable[[Calls, int], Awaitable[T]]) -> list[T]:
        """`job(calls, index)` for index in range(count), concurrently; a job may make several requests
        through `calls`, each holding one of the `concurrency` slots while it runs."""
        if not count:
            return []
        return _run_coroutine(self._run_jobs(count, job))

    async def _run_jobs(self, count: int, job: Callable[[Calls, int], Awaitable[T]]) -> list[T]:
        from openai import AsyncOpenAI

        async with AsyncOpenAI(
            api_key=self.key, base_url=self.config.base_url, timeout=self.config.timeout_s, max_retries=0
        ) as client:
            calls = Calls(self, client, asyncio.Semaphore(self.config.concurrency))
            return list(await asyncio.gather(*(job(calls, i) for i in range(count))))

    def server_url(self, path: str) -> str:
        """A path at the server root (`/tokenize`), from a base_url that ends in /v1 or not."""
        parts = urlsplit(self.config.base_url or "https://api.openai.com/v1")
        root = parts.path.rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else ""
        return urlunsplit((parts.scheme, parts.netloc, root + path, "", ""))

    async def _with_retries(
        self, send: Callable[[], Awaitable[Any]], parse: Callable[[Any], T], absent: tuple[int, ...] = ()
    ) -> T | None:
        import openai

        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            self.usage.requests += 1
            wait_hint = None
            try:
                response = await send()
                self.usage.add_tokens(getattr(response, "usage", None), self.config)
                return parse(response)
            except openai.APIStatusError as err:
                if err.status_code in absent:
                    return None
                if err.status_code != 429 and err.status_code < 500:
                    raise EndpointError(f"{self._what()}: HTTP {err.status_code}, not retried: {_brief(err)}") from err
                problem, wait_hint = f"HTTP {err.status_code}: {_brief(err)}", retry_after(err.response.headers)
            except openai.APITimeoutError:
                problem = f"no answer within {self.config.timeout_s:g} s"
            except openai.APIConnectionError as err:
                problem = f"connection failed: {err.__cause__ or err!r}"
            except (json.JSONDecodeError, openai.APIResponseValidationError) as err:
                problem = f"the response body is not the expected JSON ({err})"
            except UnusableAnswer as err:
                problem = f"unusable answer: {err}"
            if attempt + 1 == attempts:
                raise EndpointError(f"{self._what()}: gave up after {attempts} attempts; last: {problem}")
            self.usage.retries += 1
            delay = self._backoff(attempt, wait_hint)
            log.info("%s: %s; retry %d of %d in %.2f s", self._what(), problem, attempt + 1, attempts - 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, hint: float | None) -> float:
        if hint is not None:
            return min(hint, self.config.max_backoff_s)
        return random.uniform(0, min(self.config.max_backoff_s, self.config.backoff_s * 2**attempt))

    def _what(self) -> str:
        return describe(self.config, self.field)


def describe(config: EndpointConfig, field: str) -> str:
    """Which endpoint, for error messages: 'evaluation.judge (MODEL at URL)'."""
    return f"{field} ({config.model} at {config.base_url or 'the OpenAI API'})"


class Calls:
    """The requests one batch of jobs may make; each holds a concurrency slot and is retried."""

    def __init__(self, endpoint: EndpointClient, client, limit: asyncio.Semaphore):
        self.endpoint = endpoint
        self.client = client
        self.limit = limit

    async def chat(self, request: dict, parse: Callable[[Any], T]) -> T:
        """A chat completion (kwargs of `chat.completions.create`)."""
        return await self._call(lambda: self.client.chat.completions.create(**request), parse)

    async def completion(self, request: dict, parse: Callable[[Any], T]) -> T:
        """A legacy text completion (kwargs of `completions.create`; server extensions in `extra_body`)."""
        return await self._call(lambda: self.client.completions.create(**request), parse)

    async def post(self, path: str, body: dict, parse: Callable[[Any], T], absent_ok: bool = False) -> T | None:
        """A JSON POST to a path at the server root; with `absent_ok`, None where the server has no such
        endpoint, or one for another request schema (404, 405, 422), instead of an error."""
        url = self.endpoint.server_url(path)
        absent = (404, 405, 422) if absent_ok else ()
        return await self._call(lambda: self.client.post(url, cast_to=object, body=body), parse, absent)

    async def _call(self, send, parse, absent: tuple[int, ...] = ()):
        async with self.limit:
            return await self.endpoint._with_retries(send, parse, absent)


def retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if given."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return float(millis) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _brief(err) -> str:
    text = str(getattr(err, "message", err))
    return text if len(text) <= 300 else text[:300] + "..."


def _run_coroutine(coroutine):
    """asyncio.run, also from inside a running event loop (a notebook, an async Ray actor)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
