"""The chat template of the captured llama-server, ``{role}: {content}\\n`` per message.

The template in ``props.txt`` renders each message as ``role: content`` plus a newline and ends
with ``assistant: `` as the generation prompt; rendering it here keeps the prefix property the
tokenizer promises (see ``tokenizer.py``).
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
GENERATION_PROMPT = "assistant: "


class TemplateError(ValueError):
    """The request's messages cannot be rendered."""


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    raise TemplateError("message content must be a string or a list of parts")


def render_chat(messages: Any, add_generation_prompt: bool = True) -> str:
    if not isinstance(messages, list) or not messages:
        raise TemplateError("'messages' must be a non-empty array")
    out: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TemplateError("each message must be an object with a 'role'")
        out.append(f"{message['role']}: {content_text(message.get('content'))}\n")
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def render_anthropic(body: dict[str, Any]) -> str:
    messages: list[Any] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": content_text(system)})
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise TemplateError("'messages' must be a non-empty array")
    messages.extend(given)
    return render_chat(messages)
