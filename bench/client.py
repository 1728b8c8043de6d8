"""The load generator's HTTP side: one streamed OpenAI request, timed chunk by chunk.

Time to first token is taken at the first SSE event that carries generated text (not at the
headers, not at the role-only chunk); token counts and cached tokens come from the final
``usage`` chunk (``stream_options.include_usage``), with llama-server's ``timings.cache_n``
where the balancer passes it through.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Status codes a balancer uses to refuse work it cannot queue (queue full, overloaded):
# counted as rejections, apart from failures.
REJECT_STATUSES = frozenset({429, 503})


@dataclass
class Outcome:
    """What the client saw of one request; times are ``time.monotonic()`` seconds."""

    tag: str
    scheduled_at: float
    sent_at: float = 0.0
    first_token_at: float | None = None
    done_at: float | None = None
    status: int | None = None
    error: str | None = None
    rejected: bool = False
    output_tokens: int = 0
    chunks: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    chunk_delays_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_at is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_at is None else self.done_at - self.sent_at

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.done_at is None or self.first_token_at is None or self.output_tokens < 2:
            return None
        return (self.done_at - self.first_token_at) / (self.output_tokens - 1)


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    # limit=0: no client-side connection cap, or the harness itself would queue requests and
    # hide the balancer's queueing (an open-loop load must send at the scheduled time).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
    )


async def stream_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    outcome: Outcome,
    headers: dict[str, str] | None = None,
    stamped: bool = False,
) -> Outcome:
    """Send ``body`` with ``stream: true`` and fill ``outcome`` as the response arrives.

    ``stamped``: the backend writes its send time (``time.monotonic_ns()``, comparable across
    processes on Linux) as the chunk's text, and each chunk's relay delay is recorded.
    """
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    outcome.sent_at = time.monotonic()
    text_parts: list[str] = []
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            outcome.status = resp.status
            if resp.status != 200:
                detail = (await resp.read())[:200].decode("utf-8", "replace")
                outcome.rejected = resp.status in REJECT_STATUSES
                outcome.error = f"HTTP {resp.status}: {detail}"
                return outcome
            async for raw in resp.content:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                now = time.monotonic()
                if data == b"[DONE]":
                    # Done for the user; still read to the end of the body so the connection
                    # goes back to the pool clean (a balancer that holds the chunked
                    # terminator back then delays only the reuse, not this request).
                    outcome.done_at = now
                    continue
                event = json.loads(data)
                outcome.chunks += 1
                piece = _text_of(event)
                if piece:
                    if outcome.first_token_at is None:
                        outcome.first_token_at = now
                    outcome.output_tokens += 1
                    if stamped:
                        outcome.chunk_delays_s.append(now - int(piece) / 1e9)
                    else:
                        text_parts.append(piece)
                _read_usage(event, outcome)
            if outcome.done_at is None:
                outcome.done_at = time.monotonic()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
    except asyncio.CancelledError:
        outcome.error = "unfinished: cancelled at the end of the run"
        raise
    finally:
        outcome.text = "".join(text_parts)
    return outcome


async def complete_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    outcome: Outcome,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """Send ``body`` with ``stream: false`` and read its one JSON answer; its first token is its
    whole answer (``first_token_at`` = ``done_at``)."""
    payload = {**body, "stream": False}
    outcome.sent_at = time.monotonic()
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            outcome.status = resp.status
            raw = await resp.read()
            if resp.status != 200:
                outcome.rejected = resp.status in REJECT_STATUSES
                outcome.error = f"HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}"
                return outcome
        answer = json.loads(raw)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices:
            outcome.error = "no choices in the answer"
            return outcome
        outcome.first_token_at = outcome.done_at = time.monotonic()
        outcome.chunks = 1
        _read_usage(answer, outcome)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
    return outcome


def _text_of(event: dict[str, Any]) -> str:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return ""
    choice = choices[0]
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _read_usage(event: dict[str, Any], outcome: Outcome) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("prompt_tokens"), int):
            outcome.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            outcome.output_tokens = max(outcome.output_tokens, usage["completion_tokens"])
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            outcome.cached_tokens = details["cached_tokens"]
    timings = event.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        outcome.cached_tokens = timings["cache_n"]
