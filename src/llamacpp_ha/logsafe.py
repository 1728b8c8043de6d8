"""What a log line may hold of a value that came from outside: escaped, and cut.

Clients choose request paths, header values, model names; backends choose theirs. Written as
they are, a decoded newline (`%0a` in a path) forges a log line of the client's choosing, an
escape sequence (`\\x1b[31m`) rewrites the terminal that shows the log, and a long value makes a
line huge. `clean()` writes every control character (C0, DEL, C1), the Unicode line and
paragraph separators, the bidirectional overrides and lone surrogates as escapes (`\\x0a`,
`\\u2028`), doubles the backslash so that no escape can be forged either, and cuts a value
longer than its limit with an ellipsis. The formatters (`logs.py`) apply it to every message,
message argument and field, text and JSON alike, so that no call site has to remember to.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

MAX_FIELD_CHARS = 256
# A message is ours, but may embed client values (an f-string, an exception's text).
MAX_MESSAGE_CHARS = 1024
ELLIPSIS = "…"

_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# Text-format field values that need quotes to stay one `key=value` pair.
_NEEDS_QUOTES = re.compile(r'[\s="]|^$')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def clean(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`value` cut to `limit` characters, with every unsafe character escaped."""
    if len(value) > limit:
        value = value[:limit] + ELLIPSIS
    return _UNSAFE.sub(_escape, value)


def value(item: Any) -> Any:
    """A field's value for a log line: numbers, booleans and None as they are, the rest cleaned."""
    if item is None or isinstance(item, bool | int | float):
        return item
    return clean(item if isinstance(item, str) else str(item))


def text_value(item: Any) -> str:
    """A field's value for a text line, in quotes when it holds a space, `=` or `"`."""
    cleaned = value(item)
    if not isinstance(cleaned, str):
        return str(cleaned)
    if _NEEDS_QUOTES.search(cleaned):
        return '"' + cleaned.replace('"', '\\"') + '"'
    return cleaned


def message(record: logging.LogRecord) -> str:
    """The record's message, each string argument cut, the whole cut and escaped."""
    args = record.args
    if isinstance(args, Mapping):
        text = str(record.msg) % {k: _cut(v) for k, v in args.items()}
    elif args:
        text = str(record.msg) % tuple(_cut(a) for a in args)
    else:
        text = str(record.msg)
    return clean(text, MAX_MESSAGE_CHARS)


def _cut(arg: object) -> object:
    if isinstance(arg, str) and len(arg) > MAX_FIELD_CHARS:
        return arg[:MAX_FIELD_CHARS] + ELLIPSIS
    return arg
