"""The prompt-cache hit rates no balancer should beat on a workload: with infinite caches, and
with the fleet's own.

Both are computed offline with the simulator's own tokenizer, chat template and reply generator
(replies are a pure function of the prompt there), so they are exact for the simulated fleet.

- ``hit_rate_ceiling``: one backend with unbounded cache that keeps every prompt and every reply
  forever: a request hits for the longest prefix it shares with anything sent before it.
- ``capacity_ceiling``: the fleet as it is. A discrete-event replay of the workload (sessions
  arriving on schedule, each turn a think time after the previous reply) on backends that keep
  their caches exactly as the simulator does (each backend's slots, its ``--cache-ram`` with
  the profile's bytes per token, llama-server's rules: ``llamacpp_sim.prompt_cache``) and have
  their own FIFO, served in the profile's time scaled by a speed factor. The ceiling is the
  best hit rate over three oracle routers and over speeds from instant (one request at a time)
  to the profile's: how fast requests complete decides how often a conversation's next request
  arrives while its state is still being computed in a busy slot, and one timing is no more
  the truth than another. The routers: each request to the backend, among those with a free
  slot, whose caches would serve most of it at that instant (``PromptCaches.clone()``: it
  knows every cache); every prefix group (the sessions of one system prompt, or one
  conversation) pinned to one backend, groups spread in proportion to slots; every session
  pinned by a hash of its key, as the benchmark's ``direct`` client does. What this ceiling
  loses against the infinite one is what the fleet's caches cannot hold and what llama-server's
  rules drop (a slot reused for a similar prompt is cut without a save when it keeps half its
  tokens), whatever the routing and the timing. It is an oracle's best, not a proof.
"""

from __future__ import annotations

import bisect
import heapq
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.workloads import Session, Workload
from llamacpp_sim import SimConfig
from llamacpp_sim.generator import reply_pieces
from llamacpp_sim.profiles import positions_sum
from llamacpp_sim.prompt_cache import common_prefix_len
from llamacpp_sim.template import render_chat
from llamacpp_sim.tokenizer import Tokenizer

# Model seconds a turn is assumed to take when ordering requests for the infinite ceiling; only
# the order of first occurrences matters there, so an estimate is enough.
_TURN_ESTIMATE_S = 2.0


@dataclass(frozen=True)
class Sent:
    """One request of a workload as the backends see it."""

    prompt: list[int]
    reply: list[int]
    think_s: float  # after the previous turn's reply (before the first: after the start)
    group: str  # the prefix group: its system prompt, else its session (a conversation)
    session_key: str


def session_requests(session: Session, tok: Tokenizer) -> list[Sent]:
    group = f"system:{session.system}" if session.system is not None else session.key
    messages: list[dict[str, str]] = []
    if session.system is not None:
        messages.append({"role": "system", "content": session.system})
    out: list[Sent] = []
    for turn in session.turns:
        if session.completion:
            prompt = tok.tokenize(turn.content, add_bos=True)
        else:
            messages.append({"role": "user", "content": turn.content})
            prompt = tok.tokenize(render_chat(messages), add_bos=True)
        pieces = reply_pieces(prompt, turn.max_tokens)
        if not session.completion:
            messages.append({"role": "assistant", "content": "".join(pieces)})
        reply = [tok.piece_id(p) for p in pieces]
        out.append(Sent(prompt, reply, turn.think_s, group, session.key))
    return out


def sequences(workload: Workload) -> list[tuple[float, list[int], list[int]]]:
    """(nominal send time, prompt tokens, reply tokens) of every request, in time order."""
    tok = Tokenizer()
    out: list[tuple[float, list[int], list[int]]] = []
    for session in workload.sessions:
        t = session.start_s
        for sent in session_requests(session, tok):
            t += sent.think_s
            out.append((t, sent.prompt, sent.reply))
            t += _TURN_ESTIMATE_S
    out.sort(key=lambda item: item[0])
    return out


def hit_rate_ceiling(workload: Workload) -> float:
    """Token-weighted share of prompt tokens an ideal, infinite, shared cache would serve."""
    seen: list[list[int]] = []
    hit = total = 0
    for _, prompt, reply in sequences(workload):
        # The longest common prefix with any sorted sequence is with one of its two neighbours.
        i = bisect.bisect_left(seen, prompt)
        best = 0
        for j in (i - 1, i):
            if 0 <= j < len(seen):
                best = max(best, common_prefix_len(seen[j], prompt))
        # llama-server always evaluates the last prompt token, so at most n - 1 can hit.
        hit += min(best, len(prompt) - 1)
        total += len(prompt)
        bisect.insort(seen, prompt + reply)
    return hit / total if total else 0.0


@dataclass
class _Task:
    sent: Sent
    session: int
    turn: int
    slot: int = -1


class _Backend:
    """One backend of the replay: its caches as the simulator keeps them, its FIFO, and service
    times from its profile (the prompt as one step, the decode at the speed of the slots busy
    when it starts, state copies included)."""

    def __init__(self, config: SimConfig, speed: float) -> None:
        self.speed = speed  # service times are multiplied by it: 0 is instant
        self.caches = config.prompt_caches()
        self.profile = config.resolved_profile()
        self.slots = config.slots
        self.busy = 0
        self.waiting: deque[_Task] = deque()
        self.tokens = 0  # prompt tokens routed here

    def peek(self, prompt: list[int]) -> int:
        """The tokens a request would find cached here now (0 when no slot is free)."""
        launch = self.caches.clone().launch(prompt)
        return launch.cache_n if launch is not None else 0

    def start(self, task: _Task) -> tuple[float, int] | None:
        """(service time, cached tokens), or None when every slot is busy."""
        sent = task.sent
        launch = self.caches.launch(sent.prompt)
        if launch is None:
            return None
        task.slot = launch.slot_id
        # What the engine leaves in the slot, set now: a busy slot is read by no rule.
        tokens = self.caches.slots[launch.slot_id].tokens
        tokens.extend(sent.prompt[launch.cache_n :])
        tokens.extend(sent.reply[:-1])
        self.busy += 1
        profile = self.profile
        n_new = len(sent.prompt) - launch.cache_n
        prefill_s = profile.copy_s(launch.copied_bytes) + profile.step_s(
            0, n_new, prompt_positions=positions_sum(launch.cache_n, n_new)
        )
        service_s = prefill_s + len(sent.reply) * profile.step_s(self.busy, 0)
        return service_s * self.speed, launch.cache_n


Router = Callable[["_Replay", Sent], int]


class _Replay:
    """Sessions on a fleet, event by event: arrivals, and finishes that free a slot."""

    def __init__(
        self,
        sessions: list[list[Sent]],
        starts: list[float],
        configs: Sequence[SimConfig],
        speed: float,
    ) -> None:
        self.sessions = sessions
        self.starts = starts
        self.backends = [_Backend(c, speed) for c in configs]
        self._events: list[tuple[float, int, int, _Task]] = []
        self._seq = 0
        self.hit = self.total = 0

    def _push(self, t: float, backend: int, task: _Task) -> None:
        """An arrival (``backend`` -1) or the finish of ``task`` on ``backend``."""
        heapq.heappush(self._events, (t, self._seq, backend, task))
        self._seq += 1

    def _arrive_at(self, t: float, session: int, turn: int) -> None:
        sent = self.sessions[session][turn]
        self._push(t + sent.think_s, -1, _Task(sent, session, turn))

    def run(self, route: Router) -> float:
        for i, requests in enumerate(self.sessions):
            if requests:
                self._arrive_at(self.starts[i], i, 0)
        while self._events:
            t, _, b, task = heapq.heappop(self._events)
            if b < 0:
                b = route(self, task.sent)
                self.backends[b].tokens += len(task.sent.prompt)
                if not self.backends[b].waiting:
                    self._try_start(t, b, task)
                else:
                    self.backends[b].waiting.append(task)
                continue
            backend = self.backends[b]
            backend.busy -= 1
            backend.caches.release(task.slot, t)
            if backend.waiting:
                self._try_start(t, b, backend.waiting.popleft())
            if task.turn + 1 < len(self.sessions[task.session]):
                self._arrive_at(t, task.session, task.turn + 1)
        return self.hit / self.total if self.total else 0.0

    def _try_start(self, t: float, b: int, task: _Task) -> None:
        started = self.backends[b].start(task)
        if started is None:
            self.backends[b].waiting.appendleft(task)
            return
        service_s, cache_n = started
        self.hit += cache_n
        self.total += len(task.sent.prompt)
        self._push(t + service_s, b, task)


def _greedy(replay: _Replay, sent: Sent) -> int:
    """Where the caches would serve most of the request now, among backends with a free slot
    (all of them when none has one); ties to the least busy, then the least loaded."""
    backends = replay.backends
    free = [i for i, b in enumerate(backends) if b.busy < b.slots and not b.waiting]
    candidates = free or range(len(backends))
    return max(
        candidates,
        key=lambda i: (
            backends[i].peek(sent.prompt) if free else 0,
            -(backends[i].busy + len(backends[i].waiting)) / backends[i].slots,
            -backends[i].tokens / backends[i].slots,
        ),
    )


def _pinned_by_group(sessions: list[list[Sent]], configs: Sequence[SimConfig]) -> Router:
    """Every prefix group on one backend: the biggest groups first, each to the backend with
    the fewest prompt tokens per slot so far."""
    size: dict[str, int] = {}
    for requests in sessions:
        for sent in requests:
            size[sent.group] = size.get(sent.group, 0) + len(sent.prompt)
    load = [0.0] * len(configs)
    home: dict[str, int] = {}
    for group in sorted(size, key=lambda g: (-size[g], g)):
        b = min(range(len(configs)), key=lambda i: (load[i] / configs[i].slots, i))
        home[group] = b
        load[b] += size[group]
    return lambda replay, sent: home[sent.group]


def _pinned_by_session(configs: Sequence[SimConfig]) -> Router:
    """Every session on one backend by a hash of its key, in proportion to slots (the
    benchmark's ``direct`` client, ``contenders.Running.url_for``)."""
    spots = [i for i, c in enumerate(configs) for _ in range(c.slots)]
    return lambda replay, sent: spots[zlib.crc32(sent.session_key.encode()) % len(spots)]


# From one request at a time to the profile's own speed.
SPEEDS = (0.0, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Ceiling:
    hit_rate: float
    router: str
    speed: float


def capacity_ceiling(workload: Workload, configs: Sequence[SimConfig]) -> Ceiling:
    """The best hit rate of the oracle routers, over the speeds, on a fleet of ``configs``."""
    tok = Tokenizer()
    sessions = [session_requests(s, tok) for s in workload.sessions]
    starts = [s.start_s for s in workload.sessions]
    routers: dict[str, Router] = {
        "the best cache now": _greedy,
        "prefix groups pinned": _pinned_by_group(sessions, configs),
        "sessions pinned": _pinned_by_session(configs),
    }
    best = Ceiling(0.0, "", 0.0)
    for speed in SPEEDS:
        for name, route in routers.items():
            rate = _Replay(sessions, starts, configs, speed).run(route)
            if rate > best.hit_rate:
                best = Ceiling(rate, name, speed)
    return best
