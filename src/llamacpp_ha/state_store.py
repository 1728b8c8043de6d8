"""The only module that sees `redis`: what replicas share, as a few atomic scripts.

Every operation is one round trip, a Lua script that Redis runs whole, so two replicas can
never both take a backend's last slot. Every `redis` error (refused, reset, timed out, a script
that Redis refuses) becomes `StateUnavailable` here, and nothing else of `redis` leaves.

The keys, under `llamacpp-ha:`:

    leases:{backend}    sorted set: lease "{replica}|{n}" -> when it expires (ms, Redis's clock)
    key:{id}:flight     sorted set: the key's requests in flight, the same way
    key:{id}:rate       sorted set: the key's admissions in the last minute -> when
    replicas            sorted set: replica -> when its heartbeat expires
    heads               sorted set: replica -> when its oldest waiting request arrived (wall ms)
    heads:seq           hash: replica -> the sequence number of its last write to heads
    heads:model         hash: replica -> the model its oldest waiting request is for ('' any)
    events              the pub/sub channel every replica listens to

A lease that is not refreshed expires: the first script to touch that backend afterwards
removes it and says so on the channel, so a replica that died gives its slots back within
the lease's time to live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

_Arg = bytes | str | int | float  # what a script takes as an argument

PREFIX = "llamacpp-ha:"
CHANNEL = PREFIX + "events"
_REPLICAS = PREFIX + "replicas"
_HEADS = PREFIX + "heads"
_HEAD_SEQS = PREFIX + "heads:seq"
_HEAD_MODELS = PREFIX + "heads:model"


class StateUnavailable(Exception):
    """Redis did not answer, or answered with an error; the message says which."""


def lease_key(backend: str) -> str:
    return f"{PREFIX}leases:{backend}"


# Shared by every script: Redis's own clock (so replicas' clocks never matter), the leases one
# replica holds on a backend, and the sweep of expired leases, which says so on the channel.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function held(key, replica)
  local n, prefix = 0, replica .. '|'
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(m, 1, #prefix) == prefix then n = n + 1 end
  end
  return n
end
-- A replica's oldest waiting request (wall ms, or '' for none) and the model it is for: of its
-- writes, the one it made last wins, in whatever order they reach Redis (several are in flight
-- at once); `force` for a replica that starts again, whose numbers start again too.
local function set_head(heads, seqs, models, replica, seq, head, model, force)
  seq = tonumber(seq)
  if not force and seq <= tonumber(redis.call('HGET', seqs, replica) or 0) then return end
  redis.call('HSET', seqs, replica, seq)
  if head == '' then
    redis.call('ZREM', heads, replica)
    redis.call('HDEL', models, replica)
  else
    redis.call('ZADD', heads, tonumber(head), replica)
    redis.call('HSET', models, replica, model)
  end
end
local function sweep(key, backend, channel, now)
  local gone = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  if #gone == 0 then return end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local seen = {}
  for _, m in ipairs(gone) do
    local r = string.match(m, '^(.*)|[^|]*$')
    if r and not seen[r] then
      seen[r] = true
      redis.call('PUBLISH', channel, cjson.encode({'held', r, backend, held(key, r)}))
    end
  end
end
"""

# KEYS: leases, heads, replicas, heads:seq, heads:model. ARGV: backend, channel, replica, lease,
# limit, ttl_ms, note (or ''), the request's arrival (wall ms), this replica's oldest waiting
# request once this one is placed (wall ms, or '') and its model, '1' to let an older request
# at another replica go first, the head write's sequence number, the models the backend serves
# (JSON: only an older request for one of them, or for any model, goes first), the request's
# model, and how much older another replica's request must be to go first (ms). Returns
# {taken, leases held, replicas with an older request waiting}.
_CLAIM = (
    _PRELUDE
    + """
local now = now_ms()
sweep(KEYS[1], ARGV[1], ARGV[2], now)
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return {1, n, 0} end  -- run twice: taken once
local replica, age = ARGV[3], tonumber(ARGV[8])
local function waits()  -- this request waits: it is this replica's oldest if none is older
  local head, model = age, ARGV[14]
  if ARGV[9] ~= '' and tonumber(ARGV[9]) <= age then head, model = tonumber(ARGV[9]), ARGV[10] end
  set_head(KEYS[2], KEYS[4], KEYS[5], replica, ARGV[12], head, model, false)
end
if n >= tonumber(ARGV[5]) then waits() return {0, n, 0} end
if ARGV[11] == '1' then
  local older, served = 0, {}
  for _, name in ipairs(cjson.decode(ARGV[13])) do served[name] = true end
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', age - tonumber(ARGV[15]))) do
    local alive = redis.call('ZSCORE', KEYS[3], r)
    if r ~= replica and alive and tonumber(alive) > now then
      local model = redis.call('HGET', KEYS[5], r)
      if not model or model == '' or served[model] then older = older + 1 end
    end
  end
  if older > 0 and tonumber(ARGV[5]) - n <= older then waits() return {0, n, older} end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[6]), ARGV[4])
set_head(KEYS[2], KEYS[4], KEYS[5], replica, ARGV[12], ARGV[9], ARGV[10], false)
redis.call('PUBLISH', ARGV[2], cjson.encode({'held', replica, ARGV[1], held(KEYS[1], replica)}))
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[7]) end
return {1, n + 1, 0}
"""
)

# KEYS: leases. ARGV: backend, channel, replica, lease, note (or '').
_RELEASE = (
    _PRELUDE
    + """
local removed = redis.call('ZREM', KEYS[1], ARGV[4])
if removed == 1 then
  redis.call('PUBLISH', ARGV[2], cjson.encode({'held', ARGV[3], ARGV[1], held(KEYS[1], ARGV[3])}))
end
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[5]) end
return removed
"""
)

# KEYS: replicas, then one leases key per backend, then the keys' flight sets, then heads,
# heads:seq and heads:model. ARGV: replica, ttl_ms, channel, replace ('1': the listed leases
# are all this replica holds, and its head writes are numbered from here), then JSON: the
# backends (in KEYS order), their leases, the flight sets' leases; then this replica's oldest
# waiting request (wall ms, or ''), that write's sequence number, and the request's model.
_REFRESH = (
    _PRELUDE
    + """
local now = now_ms()
local replica, ttl, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local replace = ARGV[4] == '1'
local backends, leases = cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local flights = cjson.decode(ARGV[7])
local prefix = replica .. '|'
local counts = {}
for i, backend in ipairs(backends) do
  local key = KEYS[i + 1]
  sweep(key, backend, channel, now)
  local mine = leases[i]
  if replace then
    local keep = {}
    for _, lease in ipairs(mine) do keep[lease] = true end
    for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      if string.sub(m, 1, #prefix) == prefix and not keep[m] then redis.call('ZREM', key, m) end
    end
    for _, lease in ipairs(mine) do redis.call('ZADD', key, now + ttl, lease) end
    redis.call('PUBLISH', channel, cjson.encode({'held', replica, backend, #mine}))
  else
    for _, lease in ipairs(mine) do redis.call('ZADD', key, 'XX', now + ttl, lease) end
  end
  local per = {}
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local r = string.match(m, '^(.*)|[^|]*$')
    if r then per[r] = (per[r] or 0) + 1 end
  end
  counts[backend] = per
end
for i, flight in ipairs(flights) do
  local key = KEYS[#backends + 1 + i]
  for _, lease in ipairs(flight) do redis.call('ZADD', key, 'XX', now + ttl, lease) end
end
redis.call('ZADD', KEYS[1], now + ttl, replica)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = #KEYS
set_head(KEYS[n - 2], KEYS[n - 1], KEYS[n], replica, ARGV[9], ARGV[8], ARGV[10], replace)
return {cjson.encode(counts), cjson.encode(redis.call('ZRANGE', KEYS[1], 0, -1))}
"""
)

# KEYS: heads, heads:seq, heads:model. ARGV: replica, the write's sequence number, its oldest
# waiting request (wall ms, or ''), that request's model.
_SET_HEAD = (
    _PRELUDE + "set_head(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], false)"
)

# KEYS: the key's flight set, its rate set. ARGV: lease, max concurrent (or ''), requests per
# minute (or ''), ttl_ms. Returns {1} or {0, 'concurrent' | 'rate', ms until it may try again}.
_ADMIT_KEY = (
    _PRELUDE
    + """
local now = now_ms()
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return {0, 'concurrent', 1000} end
end
if ARGV[3] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, 'rate', tonumber(oldest[2]) + 60000 - now}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], 61000)
end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) * 2)
end
return {1}
"""
)


def flight_key(key_id: str) -> str:
    return f"{PREFIX}key:{key_id}:flight"


def rate_key(key_id: str) -> str:
    return f"{PREFIX}key:{key_id}:rate"


class Head(NamedTuple):
    """A replica's oldest waiting request: when it arrived (wall ms), the model it is for."""

    arrived_ms: float
    model: str = ""  # '' for any model


def _head_args(head: Head | None) -> tuple[str | int, str]:
    return ("", "") if head is None else (round(head.arrived_ms), head.model)


@dataclass(frozen=True)
class ClaimRequest:
    backend: str
    replica: str
    lease: str
    limit: int  # the backend's slots (less traffic that reaches it around every replica)
    ttl_ms: int
    arrived_ms: float  # when the request arrived (wall clock)
    head: Head | None  # this replica's oldest waiting request once this one is placed
    head_seq: int = 0  # that head write's number among the replica's (the last made wins)
    model: str = ""  # the model this request is for ('' for any)
    served: frozenset[str] = frozenset()  # the models the backend serves
    grace_ms: int = 0
    fair: bool = True
    note: bytes = b""  # published with the lease when it is taken


@dataclass(frozen=True)
class ClaimAnswer:
    taken: bool
    held: int  # leases on the backend now
    older: int = 0  # refused because this many replicas have an older request waiting


@dataclass(frozen=True)
class Snapshot:
    """What a refresh found: per backend, the leases each replica holds; the live replicas."""

    held: dict[str, dict[str, int]]
    replicas: tuple[str, ...]


@dataclass(frozen=True)
class KeyVerdict:
    admitted: bool
    reason: str = ""  # 'concurrent' or 'rate'
    retry_after_s: float = 0.0


class StateStore:
    """One Redis, two connections' worth of clients: commands, and the subscription."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        self.url = url
        self._timeout_s = timeout_s
        # A pooled connection that Redis closed (it restarted) fails once and is replaced:
        # that one retry is not an outage. Every script is safe to run twice.
        self._client = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        # The subscription waits for messages as long as there are none: no read timeout.
        self._listener = aioredis.from_url(url, socket_connect_timeout=timeout_s)
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)
        self._refresh = self._client.register_script(_REFRESH)
        self._set_head = self._client.register_script(_SET_HEAD)
        self._admit_key = self._client.register_script(_ADMIT_KEY)

    async def aclose(self) -> None:
        for client in (self._client, self._listener):
            # Bounded: closing must not hang a shutdown on a Redis that went silent.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._timeout_s * 2):
                    await client.aclose()

    async def claim(self, claim: ClaimRequest) -> ClaimAnswer:
        """Take a lease on the backend if fewer than `limit` are held and no other replica has
        a request waiting that arrived more than `grace_ms` earlier (when `fair`)."""
        c = claim
        args: list[_Arg] = [
            c.backend, CHANNEL, c.replica, c.lease, c.limit, c.ttl_ms, c.note,
            round(c.arrived_ms), *_head_args(c.head),
            "1" if c.fair else "0", c.head_seq, _json_list(sorted(c.served)), c.model,
            c.grace_ms,
        ]  # fmt: skip
        keys = [lease_key(c.backend), _HEADS, _REPLICAS, _HEAD_SEQS, _HEAD_MODELS]
        taken, held, older = await self._run(self._claim(keys=keys, args=args))
        return ClaimAnswer(bool(taken), int(held), int(older))

    async def leave(self, replica: str) -> None:
        """A replica that stops: no longer counted alive, nothing of it waiting."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(_REPLICAS, replica)
            pipe.zrem(_HEADS, replica)
            pipe.hdel(_HEAD_SEQS, replica)
            pipe.hdel(_HEAD_MODELS, replica)
            await self._run(pipe.execute())

    async def set_head(self, replica: str, head: Head | None, seq: int) -> None:
        """This replica's oldest waiting request, or none waiting; a write numbered below one
        already made (`seq`) changes nothing."""
        args: list[_Arg] = [replica, seq, *_head_args(head)]
        await self._run(self._set_head(keys=[_HEADS, _HEAD_SEQS, _HEAD_MODELS], args=args))

    async def release(self, backend: str, replica: str, lease: str, note: bytes = b"") -> None:
        args: list[_Arg] = [backend, CHANNEL, replica, lease, note]
        await self._run(self._release(keys=[lease_key(backend)], args=args))

    async def refresh(
        self,
        replica: str,
        ttl_ms: int,
        leases: Mapping[str, Sequence[str]],
        flights: Mapping[str, Sequence[str]],
        *,
        head: Head | None = None,
        head_seq: int = 0,
        replace: bool = False,
    ) -> Snapshot:
        """Extend this replica's leases and heartbeat, sweep expired leases, and read who holds
        what. `replace`: the leases listed are all it holds (after Redis was away, or on its
        first contact), and its head writes are numbered from `head_seq` on."""
        backends = list(leases)
        keys = [
            _REPLICAS,
            *(lease_key(b) for b in backends),
            *(flight_key(k) for k in flights),
            _HEADS,
            _HEAD_SEQS,
            _HEAD_MODELS,
        ]
        args: list[_Arg] = [
            replica,
            ttl_ms,
            CHANNEL,
            "1" if replace else "0",
            _json_list(backends),
            _json_list([list(leases[b]) for b in backends]),
            _json_list([list(v) for v in flights.values()]),
            _head_args(head)[0],
            head_seq,
            _head_args(head)[1],
        ]
        counts, replicas = await self._run(self._refresh(keys=keys, args=args))
        held = orjson.loads(counts)
        return Snapshot(
            # cjson writes an empty table as {}; a backend nobody holds has no entries.
            held={b: dict(held.get(b) or {}) for b in backends},
            replicas=tuple(orjson.loads(replicas) or ()),
        )

    async def admit_key(
        self,
        key_id: str,
        lease: str,
        max_concurrent: int | None,
        per_minute: int | None,
        ttl_ms: int,
    ) -> KeyVerdict:
        args: list[_Arg] = [lease, _or_empty(max_concurrent), _or_empty(per_minute), ttl_ms]
        keys = [flight_key(key_id), rate_key(key_id)]
        answer = await self._run(self._admit_key(keys=keys, args=args))
        if int(answer[0]):
            return KeyVerdict(True)
        return KeyVerdict(False, answer[1].decode(), int(answer[2]) / 1000)

    async def release_key(self, key_id: str, lease: str) -> None:
        await self._run(self._client.zrem(flight_key(key_id), lease))

    async def publish(self, message: bytes) -> None:
        await self._run(self._client.publish(CHANNEL, message))

    async def events(self) -> AsyncIterator[bytes]:
        """The channel's messages, after an empty one that says the subscription is made;
        StateUnavailable when the link is lost."""
        pubsub = self._listener.pubsub(ignore_subscribe_messages=True)
        try:
            await self._run(pubsub.subscribe(CHANNEL))
            yield b""
            while True:
                try:
                    message = await pubsub.get_message(timeout=None)
                except (RedisError, OSError) as exc:
                    raise StateUnavailable(_describe(exc)) from None
                if message is not None and message.get("type") == "message":
                    yield message["data"]
        finally:
            with contextlib.suppress(RedisError, OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(self._timeout_s * 2):
                    # PubSub.aclose() is typed from redis 8.2 on, not before: a typed name for both.
                    close: Callable[[], Awaitable[object]] = pubsub.aclose
                    await close()

    async def _run(self, call: Awaitable[Any]) -> Any:
        try:
            # A Redis that accepts the connection and then says nothing must not stall a
            # dispatch longer than the socket timeout would.
            async with asyncio.timeout(self._timeout_s * 2):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(_describe(exc)) from None


def _or_empty(value: int | None) -> str | int:
    return "" if value is None else value


def _json_list(value: Sequence[object]) -> bytes:
    # cjson decodes [] as an empty table, which is what the scripts expect of "none".
    return orjson.dumps(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
