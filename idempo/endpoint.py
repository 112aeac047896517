"""Calls to an OpenAI-compatible chat endpoint that survive a busy or flaky server.

Judges and the teacher send many small requests, each with at most `concurrency` in flight, a timeout,
and retries for what a retry can fix (429, 5xx, timeouts, unusable answers; Retry-After or jittered
exponential backoff); other errors fail at once (docs/metrics.md, "Robustness"). A judge never turns a
failure into a score. Every message built from what the server said is redacted (`idempo.redaction`).
`run_jobs` gives each job a `Calls`, so that vLLM's completions, `/tokenize` and `/detokenize` (at the
server root, not under /v1) go through the same slots and retries.

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
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from idempo.config import ConfigError, EndpointConfig
from idempo.redaction import redact

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


OPENAI_URL = "https://api.openai.com/v1"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def endpoint_url(base_url: str | None) -> str:
    """The endpoint's URL in one spelling, for cache keys: OpenAI's for null, scheme and host in lower
    case, no default port, no trailing slash, no user:password ('HTTP://Host:80/v1/' is 'http://host/v1')."""
    parts = urlsplit((base_url or OPENAI_URL).strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{parts.port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


def api_key(config: EndpointConfig, field: str) -> str:
    """The key: the environment variable `api_key_env`; where it is unset, the file named by the
    variable `<api_key_env>_FILE` or by `api_key_file` (docs/cluster.md, "Endpoint keys"). OpenAI needs a
    key; a self-hosted server usually does not, so a missing key is only an error without a `base_url`."""
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    file_variable = f"{config.api_key_env}_FILE"
    if os.environ.get(file_variable):
        return _key_from_file(os.environ[file_variable], f"environment variable {file_variable}")
    if config.api_key_file is not None:
        return _key_from_file(config.api_key_file, f"{field}.api_key_file")
    if config.base_url is None:
        raise ConfigError(
            [
                f"{field}.api_key_env: environment variable {config.api_key_env} is not set (the OpenAI API needs a "
                f"key); allowed: the key in {config.api_key_env}, or the path of a file holding it in "
                f"{file_variable} or {field}.api_key_file"
            ]
        )
    return "EMPTY"


def _key_from_file(path: str, source: str) -> str:
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise ConfigError([f"{source}: cannot read the key file {path} ({err.strerror or err})"]) from None
    if not key:
        raise ConfigError([f"{source}: the key file {path} is empty"])
    return key


class EndpointClient:
    """One endpoint, for one batch of requests at a time (`run`), with usage counted in `usage`."""

    def __init__(self, config: EndpointConfig, field: str, usage: Usage | None = None):
        self.config = config
        self.field = field
        self.key = api_key(config, field)
        self.usage = usage if usage is not None else Usage()

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a message: the key (none for a server that needs none)."""
        return (self.key,) if self.key != "EMPTY" else ()

    def redact(self, text: str) -> str:
        """Text from or about the endpoint, without its key or anything key-like (`idempo.redaction`)."""
        return redact(text, self.secrets)

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
                    # not chained: the openai error's text is the server's body, which may quote the key
                    raise EndpointError(
                        f"{self._what()}: HTTP {err.status_code}, not retried: {self._brief(err)}"
                    ) from None
                problem, wait_hint = f"HTTP {err.status_code}: {self._brief(err)}", retry_after(err.response.headers)
            except openai.APITimeoutError:
                problem = f"no answer within {self.config.timeout_s:g} s"
            except openai.APIConnectionError as err:
                problem = f"connection failed: {err.__cause__ or err!r}"
            except (json.JSONDecodeError, openai.APIResponseValidationError) as err:
                problem = f"the response body is not the expected JSON ({err})"
            except UnusableAnswer as err:
                problem = f"unusable answer: {err}"
            except EndpointError as err:  # a parse that found the answer unusable for good
                raise EndpointError(self.redact(str(err))) from None
            problem = self.redact(problem)
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

    def _brief(self, err) -> str:
        """An error's text (the server's body), redacted before it is cut short."""
        text = self.redact(str(getattr(err, "message", err)))
        return text if len(text) <= 300 else text[:300] + "..."


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
