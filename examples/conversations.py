"""Send concurrent multi-turn conversations through an OpenAI-compatible endpoint.

Each turn prints its latency, its time to first token and how many prompt tokens the server
reused from its cache (``usage.prompt_tokens_details.cached_tokens``): with a slot-aware balancer
in front of llama-servers, turns after the first should reuse nearly the whole conversation.

The default load is sized for ``llamacpp-ha demo`` (8 slots: gpu-a 4, gpu-b 2, cpu-c 2): twice
as many conversations as slots, so that on ``/monitor`` the slots fill, a queue forms, and the
follow-up turns still go back to the server that holds their conversation.

    python examples/conversations.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from openai import AsyncOpenAI

QUESTIONS = [
    "What is a slot in llama-server?",
    "Why does a follow-up turn start faster than the first one?",
    "What happens when every slot is busy?",
    "How would you spread conversations over several servers?",
    "Summarise what we discussed in one sentence.",
]
SYSTEM = (
    "You are a patient assistant who explains inference servers. "
    "Keep every answer short, concrete and friendly. " * 8
)


async def conversation(
    client: AsyncOpenAI, model: str, index: int, turns: int, max_tokens: int
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": f"Conversation {index}. {SYSTEM}"},
    ]
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": QUESTIONS[(turn - 1) % len(QUESTIONS)]})
        started = time.monotonic()
        first_token_s: float | None = None
        reply = ""
        cached: int | None = None
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first_token_s is None:
                    first_token_s = time.monotonic() - started
                reply += chunk.choices[0].delta.content
            if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        latency_s = time.monotonic() - started
        messages.append({"role": "assistant", "content": reply})
        ttft = f"{first_token_s:.3f} s" if first_token_s is not None else "-"
        print(
            f"conversation {index} turn {turn}: latency {latency_s:.3f} s, "
            f"time to first token {ttft}, cached_tokens {cached if cached is not None else '-'}",
            flush=True,
        )


async def run(args: argparse.Namespace) -> int:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    try:
        await asyncio.gather(
            *(
                conversation(client, args.model, i, args.turns, args.max_tokens)
                for i in range(1, args.conversations + 1)
            )
        )
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="The defaults suit `llamacpp-ha demo`: 16 conversations on its 8 slots queue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    parser.add_argument("--api-key", default="sk-no-key-required", help="client key")
    parser.add_argument("--model", default="sim-model", help="model name in each request")
    parser.add_argument(
        "--conversations", type=int, default=16, help="conversations running at once"
    )
    parser.add_argument("--turns", type=int, default=5, help="user turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest reply per turn")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
