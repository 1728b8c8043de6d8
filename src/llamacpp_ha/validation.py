"""Checks on a request body before it costs a queue place or a backend's time.

Only what would otherwise fail late or oddly: wrong JSON types for the fields we or
llama-server rely on, numbers out of any sane range, structures nested deeper than any real
request. llama-server remains the judge of everything else.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/v1/messages"})
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")
_INT_LIMIT = 2**31 - 1


def check_body(
    path: str, body: dict[str, Any], *, max_depth: int, max_tokens_cap: int | None
) -> None:
    _check_depth(body, max_depth)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be true or false")
    if path in _CHAT_PATHS:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise InvalidRequest("'messages' is required and must be a list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"messages[{index}] must be an object with a 'role' string")
    for name in _TOKEN_FIELDS:
        if name not in body or body[name] is None:
            continue
        value = body[name]
        # llama-server reads n_predict -1 as "until the context is full".
        if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= _INT_LIMIT:
            raise InvalidRequest(f"'{name}' must be an integer from -1 to {_INT_LIMIT}")
        if max_tokens_cap is not None and (value > max_tokens_cap or value == -1):
            raise InvalidRequest(f"'{name}' may be at most {max_tokens_cap} on this server")
    for name, low, high in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0), ("n", 1, 128)):
        if name in body and body[name] is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"'{name}' must be a number")
            if not low <= value <= high:
                raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}")


def _check_depth(value: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequest(f"the JSON body is nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
