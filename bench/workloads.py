"""Seeded, reproducible workloads, in model seconds and tokens of the simulated fleet.

Text is made of short lowercase words, each one token for the simulator's tokenizer (a run of
up to six letters and its trailing space), so a length in words is a length in tokens and a
shared run of words is a shared, byte-identical token prefix. Every time here is in model
seconds; the runner divides by the fleet's time scale.

- ``chat``: a few ~1,000-token system prompts shared by many multi-turn sessions (user messages
  ~80 tokens, replies ``max_tokens`` ~150, think time between turns), sessions arriving as a
  Poisson process. A session's next turn carries the real reply of the previous one, so turns
  within a session wait for each other; sessions arrive open-loop.
- ``mooncake``: a sample of whole conversations of the Mooncake trace (see ``mooncake()``).
- ``random``: single requests with no shared prefix at all, Poisson arrivals.
- ``burst``: first turns on the shared system prompts, nearly all arriving at once.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces"
TRACE_FILE = "mooncake-conversation.jsonl"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Turn:
    """One request of a session: a user message (chat) or a whole prompt (completion)."""

    content: str
    max_tokens: int
    think_s: float = 0.0


@dataclass(frozen=True)
class Session:
    """Requests that build on each other; ``key`` names the session (direct routing)."""

    start_s: float
    key: str
    turns: tuple[Turn, ...]
    system: str | None = None
    completion: bool = False


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    description: str
    sessions: tuple[Session, ...]

    @property
    def n_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    @property
    def span_s(self) -> float:
        return max((s.start_s for s in self.sessions), default=0.0)


def words(rng: random.Random, n: int) -> str:
    """``n`` tokens of text: n random words of 2-6 letters, each followed by a space."""
    return "".join(
        "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 6))) + " " for _ in range(n)
    )


def _around(rng: random.Random, mean: int, spread: int) -> int:
    return max(1, round(rng.uniform(mean - spread, mean + spread)))


def _poisson_times(rng: random.Random, rate_per_s: float, span_s: float) -> list[float]:
    times, t = [], rng.expovariate(rate_per_s)
    while t < span_s:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


def chat(
    seed: int,
    name: str,
    sessions_per_s: float,
    span_s: float,
    n_system: int = 3,
    system_tokens: int = 1000,
    turns: tuple[int, int] = (2, 5),
    user_tokens: int = 80,
    reply_tokens: int = 150,
    think_mean_s: float = 2.0,
) -> Workload:
    rng = random.Random(f"{seed}-{name}")
    systems = [words(random.Random(f"{seed}-system-{i}"), system_tokens) for i in range(n_system)]
    sessions = []
    for i, start in enumerate(_poisson_times(rng, sessions_per_s, span_s)):
        n_turns = rng.randint(*turns)
        session_turns = tuple(
            Turn(
                content=words(rng, _around(rng, user_tokens, 20)),
                max_tokens=_around(rng, reply_tokens, 30),
                think_s=rng.expovariate(1.0 / think_mean_s) if t else 0.0,
            )
            for t in range(n_turns)
        )
        sessions.append(Session(start, f"{name}-{i}", session_turns, system=rng.choice(systems)))
    n_req = sum(len(s.turns) for s in sessions)
    return Workload(
        name,
        f"Multi-turn chat, {sessions_per_s:g} sessions/s",
        f"{len(sessions)} sessions ({n_req} requests) arriving as a Poisson process at "
        f"{sessions_per_s:g}/s over {span_s:g} s; {n_system} shared system prompts of "
        f"{system_tokens} tokens; {turns[0]}-{turns[1]} turns; user messages ~{user_tokens} "
        f"tokens; replies ~{reply_tokens} tokens; think time exponential, mean {think_mean_s:g} s",
        tuple(sessions),
    )


def random_prompts(
    seed: int,
    name: str,
    rate_per_s: float,
    span_s: float,
    prompt_tokens: int = 1000,
    spread: int = 400,
) -> Workload:
    rng = random.Random(f"{seed}-{name}")
    sessions = tuple(
        Session(
            t,
            f"{name}-{i}",
            (Turn(words(rng, _around(rng, prompt_tokens, spread)), _around(rng, 150, 30)),),
        )
        for i, t in enumerate(_poisson_times(rng, rate_per_s, span_s))
    )
    return Workload(
        name,
        "Random prompts, no shared prefix",
        f"{len(sessions)} single-turn requests, Poisson at {rate_per_s:g}/s over {span_s:g} s; "
        f"prompts of {prompt_tokens - spread}-{prompt_tokens + spread} random tokens, no two "
        "sharing a prefix; replies ~150 tokens",
        sessions,
    )


def burst(
    seed: int,
    name: str,
    per_burst: int,
    n_bursts: int = 2,
    gap_s: float = 12.0,
    within_s: float = 0.5,
    n_system: int = 3,
    system_tokens: int = 1000,
) -> Workload:
    rng = random.Random(f"{seed}-{name}")
    systems = [words(random.Random(f"{seed}-system-{i}"), system_tokens) for i in range(n_system)]
    sessions = []
    for b in range(n_bursts):
        for i in range(per_burst):
            turn = Turn(words(rng, _around(rng, 80, 20)), _around(rng, 150, 30))
            start = b * gap_s + rng.uniform(0.0, within_s)
            sessions.append(Session(start, f"{name}-{b}-{i}", (turn,), system=rng.choice(systems)))
    sessions.sort(key=lambda s: s.start_s)
    return Workload(
        name,
        "Bursts",
        f"{n_bursts} burst{'s' if n_bursts > 1 else ''} of {per_burst} requests, each burst "
        f"arriving within {within_s:g} s, "
        f"{gap_s:g} s apart; first chat turns on {n_system} shared {system_tokens:,}-token system "
        "prompts",
        tuple(sessions),
    )


class TraceRow(TypedDict):
    """One line of the Mooncake conversation trace (lengths in tokens, ids of 512-token blocks)."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: list[int]


@dataclass(frozen=True)
class TraceScale:
    """How the Mooncake trace is shrunk to the simulated fleet."""

    conversations: int
    span_s: float
    token_divisor: int = 16
    output_divisor: int = 4
    max_prompt_tokens: int = 6000

    @property
    def block_tokens(self) -> int:
        return 512 // self.token_divisor


def mooncake(seed: int, name: str, scale: TraceScale, trace_dir: Path = TRACE) -> Workload:
    """Whole conversations sampled from the trace, shrunk in length and time.

    Requests of one conversation share their first blocks, so a sample of conversations (the
    requests whose second block id is one of a seeded choice of ids seen at least twice) keeps
    the trace's reuse, which a short time window of it would lose. Every 512-token block becomes
    ``512 / token_divisor`` words drawn from a generator seeded by the block id, so equal ids
    give byte-identical text; the hour is compressed to ``span_s``.
    """
    lines = (trace_dir / TRACE_FILE).read_text().splitlines()
    rows: list[TraceRow] = [json.loads(line) for line in lines]
    groups: dict[int, list[TraceRow]] = {}
    for row in rows:
        ids = row["hash_ids"]
        if isinstance(ids, list) and len(ids) > 1:
            groups.setdefault(int(ids[1]), []).append(row)
    eligible = sorted(k for k, v in groups.items() if len(v) >= 2)
    chosen = random.Random(f"{seed}-{name}").sample(eligible, scale.conversations)
    picked = sorted((r for k in chosen for r in groups[k]), key=lambda r: int(r["timestamp"]))
    t_first = int(picked[0]["timestamp"])
    t_span = max(int(picked[-1]["timestamp"]) - t_first, 1)
    block_text: dict[int, str] = {}

    def text_of(block_id: int) -> str:
        if block_id not in block_text:
            block_text[block_id] = words(random.Random(f"block-{block_id}"), scale.block_tokens)
        return block_text[block_id]

    sessions = []
    for row in picked:
        n_tokens = min(
            math.ceil(int(row["input_length"]) / scale.token_divisor), scale.max_prompt_tokens
        )
        blocks = [text_of(int(b)) for b in row["hash_ids"]]
        # Each word is one token followed by one space, so cutting whole words cuts tokens.
        prompt = "".join(blocks).split(" ")[:n_tokens]
        out = max(1, math.ceil(int(row["output_length"]) / scale.output_divisor))
        start = (int(row["timestamp"]) - t_first) / t_span * scale.span_s
        key = f"conv-{row['hash_ids'][1]}"
        sessions.append(Session(start, key, (Turn(" ".join(prompt) + " ", out),), completion=True))
    return Workload(
        name,
        "Mooncake conversation trace replay",
        f"{len(sessions)} requests of {scale.conversations} conversations sampled (seeded) from "
        f"the Mooncake conversation trace; token lengths / {scale.token_divisor} (a 512-token "
        f"block = {scale.block_tokens} tokens), outputs / {scale.output_divisor}, prompts capped "
        f"at {scale.max_prompt_tokens} tokens, the trace's hour compressed to {scale.span_s:g} s; "
        "sent as /v1/completions with the raw prompt text",
        tuple(sessions),
    )
