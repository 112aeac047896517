"""Endpoint sections: OpenAI-compatible chat endpoints (judges, teachers) and how hard to lean on them."""

from __future__ import annotations

import re

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from idempo.config.base import Section, choices
from idempo.registry import JUDGES

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EndpointConfig(Section):
    """An OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...) and how hard to lean on it."""

    # a key pasted into a field must not be echoed by pydantic's own message either
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)

    model: str | None = Field(None, description="Model name at the endpoint (openai) or hub id / dir / 'tiny' (hf).")
    base_url: str | None = Field(None, description="Endpoint URL, e.g. http://host:8000/v1; null: OpenAI's.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="NAME of the environment variable holding the API key (never the key)."
    )
    api_key_file: str | None = Field(
        None,
        description="Path of a file holding the key (mode 0600, or a mounted secret), read where neither api_key_env "
        "nor <api_key_env>_FILE is set; the file is read on the machine that calls the endpoint.",
    )
    concurrency: int = Field(16, gt=0, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(6, ge=0, description="Retries on 429, 5xx, timeouts, connection errors, bad answers.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff; doubles per retry, full jitter.")
    max_backoff_s: float = Field(60.0, ge=0, description="Cap on one wait, Retry-After included.")
    price_input_per_mtok: float | None = Field(None, ge=0, description="USD per million prompt tokens (for cost).")
    price_output_per_mtok: float | None = Field(None, ge=0, description="USD per million completion tokens.")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            # its own type, so that `describe_error` never shows the value: it may be a key
            raise PydanticCustomError(
                "variable_name", "must be the name of an environment variable (like OPENAI_API_KEY), not a key"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


# Endpoint fields that say how hard an endpoint is leaned on, where its key comes from, what it costs and
# when a judge's refusals fail the run, never what it answers (an exhausted retry budget or too many
# refusals fails the run; it scores nothing): a trial resumes under new values of them.
ENDPOINT_PACE = (
    "concurrency",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_backoff_s",
    "price_input_per_mtok",
    "price_output_per_mtok",
    "api_key_env",
    "api_key_file",
    "max_refusal_rate",
)


class TeacherConfig(EndpointConfig):
    """A teacher model that writes D_seed in the persona's voice (the authors used GPT-4o at T=1)."""

    temperature: float = Field(
        1.0, ge=0, description="The teacher's sampling temperature (the authors: GPT-4o at 1.0)."
    )
    examples_per_request: int = Field(10, gt=0, description="Questions answered per request (one JSON reply).")
    max_tokens: int = Field(8192, gt=0, description="Completion budget of one request.")
    json_mode: bool = Field(True, description="Ask for response_format json_object (turn off where unsupported).")

    @model_validator(mode="after")
    def _named_model(self) -> TeacherConfig:
        if self.model is None:
            raise ValueError("model is required: the teacher's model name at the endpoint")
        return self


class JudgeConfig(EndpointConfig):
    """A scorer of (question, answer) pairs on 0-100: regex markers, an endpoint, or a local HF model."""

    backend: str = Field("marker", description="marker: persona regexes; openai: an endpoint; hf: a local model.")
    top_logprobs: int = Field(
        20, ge=1, le=20, description="Next-token alternatives an endpoint returns at each position read (openai)."
    )
    refusal_mass: float = Field(0.25, ge=0, le=1, description="Below this probability on numbers: a refusal.")
    max_refusal_rate: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Share of refusals among the answers judged at once (an evaluation) above which the run fails: "
        "the judge gives no usable number. 1: never fails.",
    )
    max_tokens: int = Field(4, gt=0, description="Tokens the judge may write (the text fallback reads them).")
    batch_size: int = Field(8, gt=0, description="Judge prompts per forward pass (hf).")
    continuation_batch: int = Field(
        32, gt=0, description="Number continuations per forward pass over the cached prompts (hf); bounds memory."
    )
    max_reasoning_tokens: int = Field(
        1024,
        gt=0,
        description="Reasoning a thinking-only judge may write before its number; unclosed by then: a refusal.",
    )
    cache: bool = Field(True, description="Keep answers on disk so a repeated judgment costs nothing.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in JUDGES:
            raise ValueError(f"unknown judge backend; allowed: {choices(JUDGES)}")
        return value

    @model_validator(mode="after")
    def _model_matches_backend(self) -> JudgeConfig:
        if self.backend == "marker" and self.model is not None:
            raise ValueError("model is only read by the openai and hf backends (backend is 'marker')")
        if self.backend != "marker" and self.model is None:
            raise ValueError(f"model is required for backend {self.backend!r}")
        return self


def _rubric_judge(value: JudgeConfig | None) -> JudgeConfig | None:
    """Judges of coherence and rewards read a rubric: a language model, not regex markers."""
    if value is not None and value.backend == "marker":
        raise ValueError("this judge reads a rubric and needs a language model; allowed backends: 'hf', 'openai'")
    return value
