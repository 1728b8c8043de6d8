"""A stream whose backend died, continued on another: what the client has seen, and the rest.

`Transcript` reads every whole SSE event as it goes to the client: the stream's `id`, `model`
and `created`, the text delivered (chat `delta.content`, completions `text`, llama-server's
`content`) and how many events carried it (llama-server sends one token per event). When the
backend breaks the stream, `continuation()` is the same request again with that text appended:
for chat, as a final assistant message (merged into one the client sent), which llama-server
continues rather than answering anew; for completions, appended to the prompt; and the token
limit reduced by what was delivered. `rewrite()` then makes the new backend's events look like
the first one's: same `id`, `model` and `created`, no second role announcement, and `usage` at
the end counting what the client received.

What cannot be continued (`blocker`): a tool call or reasoning already under way (their
partial deltas cannot be replayed as a prefix), a choice that already finished, `n` > 1,
`logprobs`, a prompt that is not a string. Those end with the error event as before.
"""

from __future__ import annotations

from typing import Any

import orjson

CHAT = "/v1/chat/completions"
COMPLETIONS = ("/v1/completions", "/completion")
RESUMABLE_PATHS = (CHAT, *COMPLETIONS)
_LIMITS = ("max_tokens", "max_completion_tokens", "n_predict")


class Transcript:
    """What the client has received of one stream, read from its events as they are sent."""

    def __init__(self, path: str, payload: dict[str, Any]) -> None:
        self.path = path
        self.payload = payload
        self.text: list[str] = []
        self.tokens = 0  # events that carried text
        self.ident: dict[str, Any] = {}  # id, model, created of the first backend's stream
        self.blocker: str | None = _refuses(path, payload)
        self.finished = False
        self.resumed = 0

    def read(self, event: dict[str, Any] | None) -> None:
        """One good event of the stream, as it goes to the client (None: `[DONE]`)."""
        if event is None:
            self.finished = True
            return
        if self.blocker is not None:  # once it cannot be continued, the rest does not matter
            return
        self._read(event)

    def read_text(self, text: str) -> None:
        """A chat token's text (`sse.EventReader`): an event of one not finished choice whose
        delta is this text alone."""
        if self.blocker is None and text:
            self.text.append(text)
            self.tokens += 1

    def feed(self, events: bytes) -> None:
        """Whole events that have been sent to the client."""
        for data in _data_lines(events):
            if data == b"[DONE]":
                self.read(None)
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self.read(event)

    def _read(self, event: dict[str, Any]) -> None:
        if not self.ident:
            self.ident = {k: event[k] for k in ("id", "model", "created") if k in event}
        if self.path == "/completion":
            content = event.get("content")
            if isinstance(content, str) and content:
                self.text.append(content)
                self.tokens += 1
            if event.get("stop") is True:
                self.finished = True
            return
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self.finished = True
            delta = choice.get("delta") if self.path == CHAT else choice
            if not isinstance(delta, dict):
                continue
            if delta.get("tool_calls") or delta.get("function_call"):
                self.blocker = "a tool call was under way"
            if delta.get("reasoning_content"):
                self.blocker = "reasoning was under way"
            piece = delta.get("content") if self.path == CHAT else delta.get("text")
            if isinstance(piece, str) and piece:
                self.text.append(piece)
                self.tokens += 1

    def why_not(self, max_resumes: int) -> str | None:
        """None when the stream may be continued now; else why not."""
        if self.blocker is not None:
            return self.blocker
        if self.finished:
            return "the answer had ended"
        if self.resumed >= max_resumes:
            return f"resumed {self.resumed} times already"
        return None

    def continuation(self) -> bytes:
        """The request that continues the answer from what was delivered."""
        body = dict(self.payload)
        delivered = "".join(self.text)
        for name in _LIMITS:
            value = body.get(name)
            if type(value) is int and value > 0:
                body[name] = max(1, value - self.tokens)
        if self.path == CHAT:
            messages = list(body.get("messages") or [])
            last = messages[-1] if messages else None
            if isinstance(last, dict) and last.get("role") == "assistant":
                before = last.get("content")
                text = before if isinstance(before, str) else ""
                messages[-1] = {**last, "content": text + delivered}
            else:
                messages.append({"role": "assistant", "content": delivered})
            body["messages"] = messages
        else:
            body["prompt"] = str(body.get("prompt", "")) + delivered
        return orjson.dumps(body)

    def rewrite(self, events: bytes) -> bytes:
        """The continuation's events as the client's stream goes on: the first backend's `id`,
        `model`, `created`; the role not announced again; `usage` of the whole answer."""
        out: list[bytes] = []
        for block in events.split(b"\n\n"):
            if not block.strip():
                continue
            data = next(iter(_data_lines(block)), None)
            if data is None or data == b"[DONE]":
                out.append(block)
                continue
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                out.append(block)
                continue
            if not isinstance(event, dict):
                out.append(block)
                continue
            event.update(self.ident)
            if self.path == CHAT and _only_role(event):
                continue
            usage = event.get("usage")
            if isinstance(usage, dict):
                event["usage"] = self._whole(usage)
            self._read(event)  # delivered too: a second resume starts after it
            out.append(b"data: " + orjson.dumps(event))
        return b"".join(block + b"\n\n" for block in out)

    def _whole(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The continuation's usage as the whole answer's: its prompt held what was delivered
        before (text, not new prompt), which counts as generated."""
        fixed = dict(usage)
        earlier = self.tokens_before_resume
        if type(fixed.get("completion_tokens")) is int:
            fixed["completion_tokens"] += earlier
        if type(fixed.get("prompt_tokens")) is int:
            fixed["prompt_tokens"] = max(0, fixed["prompt_tokens"] - earlier)
        if type(fixed.get("prompt_tokens")) is int and type(fixed.get("completion_tokens")) is int:
            fixed["total_tokens"] = fixed["prompt_tokens"] + fixed["completion_tokens"]
        return fixed

    def resuming(self) -> None:
        self.resumed += 1
        self.tokens_before_resume = self.tokens

    tokens_before_resume = 0


def _refuses(path: str, payload: dict[str, Any]) -> str | None:
    if path not in RESUMABLE_PATHS:
        return "this endpoint is not continued"
    if payload.get("stream") is not True:
        return "not a stream"
    n = payload.get("n", 1)
    if n not in (None, 1):
        return "n > 1"
    if payload.get("logprobs") or payload.get("n_probs") or payload.get("top_logprobs"):
        return "logprobs were asked for"
    if path != CHAT and not isinstance(payload.get("prompt"), str):
        return "the prompt is not one string"
    return None


def _only_role(event: dict[str, Any]) -> bool:
    choices = event.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta")
    return (
        isinstance(delta, dict)
        and set(delta) <= {"role", "content"}
        and not delta.get("content")
        and not choices[0].get("finish_reason")
    )


def _data_lines(events: bytes) -> list[bytes]:
    return [line[5:].strip() for line in events.split(b"\n") if line.startswith(b"data:")]
