"""Request bodies (pydantic), validated at the boundary; the engine trusts what passes.

OpenAI's request shapes for ``/v1/completions`` and ``/v1/chat/completions``, plus two
extensions: ``routing`` (how this request's tokens are routed) and ``ignore_eos`` (vLLM's name:
keep generating past end-of-sequence, for fixed-length benchmarks). Fields OpenAI defines that
the server does not implement (``logprobs``, penalties, ``user``...) are accepted and ignored,
as most OpenAI-compatible servers do, except ``n``: only ``n = 1`` is served (a clear 400
otherwise). A value out of range is a 400 whose message names the field.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Routing(BaseModel):
    """``{"router": "arrow", "top_k": 2, "temperature": 1.0}`` | ``{"router": "retrieval", "top_k": 2}``
    | ``{"router": "arrow-vote", "top_k": 1}``
    | ``{"adapters": {"sql": 0.7, "dates": 0.3}}`` | ``{"router": "saved", "name": "my-moe"}``
    | ``{"router": "uniform"}``."""

    model_config = ConfigDict(extra="forbid")

    router: str | None = None
    top_k: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    name: str | None = None
    adapters: dict[str, float] | None = None

    @field_validator("adapters")
    @classmethod
    def _weights(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must name at least one adapter")
            bad = {n: w for n, w in v.items() if not math.isfinite(w) or w < 0}
            if bad:
                raise ValueError(f"weights must be finite and >= 0, got {bad}")
        return v


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    routing: Routing | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"give one prompt per request (got {len(v)})")
            return v[0]
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
