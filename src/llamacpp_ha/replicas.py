"""Several balancer replicas acting as one, through shared state (`state_store.py`).

What each replica keeps to itself and what it shares:

- **Slots.** The scheduler still chooses and claims in this process, with no await between;
  then `confirm()` takes the lease in Redis (one round trip, atomic: "if fewer than the slots
  are held"). A refusal means another replica took the slot in the meantime: the request goes
  back to the front of this replica's queue. So the sum over replicas never exceeds a backend's
  slots. Each claim and release is announced on the channel, so every replica counts the slots
  the others hold (`SlotLedger.shared`) and a waiting replica drains as soon as one frees.
- **Leases expire.** Each replica extends its own every `lease_ttl_s / 3`; a replica that dies
  stops, and its leases are swept within `lease_ttl_s`.
- **Routing.** What a replica sends and what comes back is announced too (`sent`, `answered`,
  `done`): the others replay it (`replay.py`) into their own prefix index and cache shadows, so
  a conversation's next turn finds its backend whichever replica receives it.
- **Operations.** An admin drain, add, remove or reload is announced and applied by all.
- **Redis away.** Any error puts this replica on local accounting: it takes at most its share
  (slots / live replicas, rounded up) of each backend, logs one warning, and goes on. Once
  Redis answers again it re-registers exactly the leases it holds and shares again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .config import without_credentials
from .prefix_index import PrefixIndex
from .replay import RoutingReplay
from .state_store import (
    ClaimAnswer,
    ClaimRequest,
    Head,
    Snapshot,
    StateStore,
    StateUnavailable,
)

if TYPE_CHECKING:
    from .queue import Lease, RequestQueue
    from .registry import BackendState, Registry

log = logging.getLogger("llamacpp_ha.replicas")

_RETRY_S = 1.0  # how soon to try Redis again once it has gone away
# Fleet-wide order: a request gives way to one waiting at another replica that arrived at least
# this much earlier (clocks of different hosts differ by a few ms; the balancer sets half the
# reordering window, the unfairness a replica allows itself), at most this many times, and
# looks again after this long if the slot is still free.
MIN_FAIR_GRACE_MS = 20
_MAX_DEFERRALS = 3
_DEFER_S = 0.05


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ReplicaStats:
    """What sharing costs and how often it said no, for /monitor and /metrics."""

    claims: int = 0
    refused: int = 0  # claims Redis refused: another replica had taken the slot
    deferred: int = 0  # claims that gave way to an older request waiting at another replica
    outages: int = 0  # times Redis went away
    round_trips: int = 0
    round_trip_s: float = 0.0
    max_round_trip_s: float = 0.0
    events: int = 0
    since: float = field(default_factory=time.monotonic)

    def timed(self, seconds: float) -> None:
        self.round_trips += 1
        self.round_trip_s += seconds
        self.max_round_trip_s = max(self.max_round_trip_s, seconds)


class Replicas:
    """This replica among the others. Owns the store's connections and its two tasks."""

    def __init__(
        self,
        store: StateStore,
        replica_id: str,
        lease_ttl_s: float,
        registry: Registry,
        index: PrefixIndex,
        queue: RequestQueue,
        unconfirmed: set[Lease],
        wakeup: Callable[[], None],
        apply_op: Callable[[str, Any], None],
    ) -> None:
        self.store = store
        self.id = replica_id
        self.ttl_s = lease_ttl_s
        self._registry = registry
        self._queue = queue
        # Placed here and not yet confirmed in shared state: still waiting, for the order.
        self._unconfirmed = unconfirmed
        self._wakeup = wakeup
        self._apply_op = apply_op
        self.up = False
        self._warned = False  # one warning per outage (the first contact may fail too)
        self.last_error: str | None = None
        self.live: tuple[str, ...] = (replica_id,)
        # Back from an outage: the replicas we knew, until each has registered again what it
        # holds (or a lease's lifetime has passed), and how many shared the fleet then. Until
        # then shared state undercounts their leases, so this one keeps to its local share.
        self._awaiting: set[str] = set()
        self._awaiting_until = 0.0
        self._recovery_split = 1
        self.stats = ReplicaStats()
        # Per backend: the leases other replicas hold (replica -> count), and ours.
        self._others: dict[str, dict[str, int]] = {}
        self._floor: dict[str, int] = {}  # a refusal's count, until the next event says more
        self._mine: dict[str, set[str]] = {}
        self._flights: dict[str, set[str]] = {}  # per client key: our requests in flight
        self._releasing: dict[str, set[asyncio.Task[None]]] = {}  # per backend, not yet done
        # Our oldest waiting request (wall ms) as our last write to shared state said, for
        # the fleet-wide order, and that write's number: several can be in flight at once
        # (claims say it too), and Redis keeps the last one made whatever order they land in.
        self._head: Head | None = None
        self._head_seq = 0
        self._head_syncing = False
        self.fair_grace_ms = MIN_FAIR_GRACE_MS
        self._serial = itertools.count(1)
        self._replay = RoutingReplay(index, self._find)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []

    # Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # Serve in shared state from the first request when Redis answers now; otherwise on
        # local accounting until it does.
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._listen(), name="replicas-listen"),
            loop.create_task(self._refresh_loop(), name="replicas-refresh"),
        ]

    async def aclose(self) -> None:
        # The last releases first (shutdown drained the exchanges just before): a lease left
        # behind would hold its slot in shared state until it expires.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2 * _RETRY_S)
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * _RETRY_S)
        if self.up:
            # The others stop counting us at once (their shares if Redis goes away, the order).
            with contextlib.suppress(StateUnavailable):
                await self.store.leave(self.id)
        await self.store.aclose()

    @property
    def pending(self) -> int:
        """Releases and announcements sent and not yet acknowledged by Redis."""
        return len(self._tasks)

    def new_lease_id(self) -> str:
        return f"{self.id}|{next(self._serial)}"

    # Slots -----------------------------------------------------------------------------

    async def confirm(self, lease: Lease, deferred: int) -> str:
        """Take `lease`'s slot in shared state too: "taken"; "full" when another replica has
        it; "older" when another replica has a request waiting that arrived earlier (it goes
        first, unless this one has already deferred `_MAX_DEFERRALS` times).

        The lease is ours before the round trip: cancelled during it, its release takes back
        whatever Redis did."""
        backend = lease.backend
        ledger = backend.slots
        lease_id = self.new_lease_id()
        self._mine.setdefault(backend.name, set()).add(lease_id)
        lease.shared_id = lease_id
        lease.on_release = self._released
        releasing = self._releasing.get(backend.name)
        if releasing:
            # Our own releases there first: the slot freed here must be free in Redis too
            # before we take it again, or Redis refuses what we just gave back.
            await asyncio.wait(set(releasing))
        arrived_ms = _wall_ms(lease.arrived_at)
        if self.up:
            head = self._oldest(excluding=lease)
            self._head_seq += 1
            claim = ClaimRequest(
                backend=backend.name,
                replica=self.id,
                lease=lease_id,
                limit=max(0, ledger.total - ledger.external_busy),
                ttl_ms=self._ttl_ms,
                arrived_ms=arrived_ms,
                head=head,
                head_seq=self._head_seq,
                model=self._model_key(lease.model),
                served=backend.model_names,
                grace_ms=self.fair_grace_ms,
                fair=deferred < _MAX_DEFERRALS,
                note=_encode(["sent", self.id, lease_id, backend.name, *_prompt_fields(lease)]),
            )
            started = time.perf_counter()
            answer: ClaimAnswer | None = None
            try:
                answer = await self.store.claim(claim)
            except StateUnavailable as exc:
                self._lost(str(exc))
            if answer is not None:
                return self._claimed(lease, claim, answer, head, time.perf_counter() - started)
        # Redis is away: our share of the backend, no more.
        if ledger.in_flight > _share(ledger.total, len(self.live)):
            self._forget(lease)
            return "full"
        return "taken"

    def _claimed(
        self,
        lease: Lease,
        claim: ClaimRequest,
        answer: ClaimAnswer,
        head: Head | None,
        took_s: float,
    ) -> str:
        self.stats.timed(took_s)
        self.stats.claims += 1
        backend = lease.backend
        # What the claim wrote as our head, unless a later write was made meanwhile (the
        # scheduler tells us of the queue once the lease has left `unconfirmed`).
        latest = claim.head_seq == self._head_seq
        if answer.taken:
            if latest:
                self._head = head
            return "taken"
        self._forget(lease)
        if latest:
            ours = Head(claim.arrived_ms, claim.model)
            self._head = ours if head is None or ours.arrived_ms < head.arrived_ms else head
        mine = len(self._mine.get(backend.name, ()))
        if answer.older:
            self.stats.deferred += 1
            # The slots left are for the older requests: believe them taken for a moment,
            # then look again (they may not fit those requests after all).
            self._floor[backend.name] = answer.held + answer.older - mine
            self._update(backend)
            asyncio.get_running_loop().call_later(_DEFER_S, self._look_again, backend.name)
            return "older"
        self.stats.refused += 1
        # Believe the count until an event says otherwise, so the next drain does not pick
        # this backend again at once.
        self._floor[backend.name] = answer.held - mine
        self._update(backend)
        return "full"

    def _look_again(self, name: str) -> None:
        self._floor.pop(name, None)
        backend = self._find(name)
        if backend is not None:
            self._update(backend)
        self._wakeup()

    def queue_changed(self) -> None:
        """After each drain: tell shared state when our oldest waiting request changed."""
        head = self._oldest()
        if self.up and head != self._head and not self._head_syncing:
            self._head_syncing = True
            self._spawn(self._sync_head())

    async def _sync_head(self) -> None:
        try:
            while (head := self._oldest()) != self._head:
                self._head = head
                self._head_seq += 1
                await self.store.set_head(self.id, head, self._head_seq)
        finally:
            self._head_syncing = False

    def _oldest(self, excluding: Lease | None = None) -> Head | None:
        """Our oldest waiting request, queued or placed here after waiting and not yet
        confirmed in shared state (but `excluding`): when it arrived and the model it is
        for; None if none. One placed as it arrived is not waiting: its claim says whether
        it must (a write of its own would be a second round trip per request)."""
        at, model = math.inf, None
        for lease in self._unconfirmed:
            if lease.waited and lease is not excluding and lease.arrived_at < at:
                at, model = lease.arrived_at, lease.model
        first = self._queue.first()  # after every drain: no copy of a long queue
        if first is not None and first.enqueued_at < at:
            at, model = first.enqueued_at, first.routing.model
        return None if at == math.inf else Head(_wall_ms(at), self._model_key(model))

    def _model_key(self, model: str | None) -> str:
        """The model a request waits for, as the fleet-wide order compares them: '' when any
        backend will do (no model named, or a fleet of one model)."""
        return "" if model is None or self._registry.single_model() else model

    def _forget(self, lease: Lease) -> None:
        if lease.shared_id is not None:
            self._mine.get(lease.backend.name, set()).discard(lease.shared_id)
        lease.shared_id = None
        lease.on_release = None

    def _released(self, lease: Lease) -> None:
        lease_id = lease.shared_id
        if lease_id is None:
            return
        name = lease.backend.name
        self._mine.get(name, set()).discard(lease_id)
        if self.up:
            note = _encode(["done", self.id, lease_id, name])
            task = self._spawn(self.store.release(name, self.id, lease_id, note))
            releasing = self._releasing.setdefault(name, set())
            releasing.add(task)
            task.add_done_callback(releasing.discard)

    def _update(self, backend: BackendState) -> None:
        """Tell `backend`'s ledger what the others hold; drain when that freed a slot."""
        if self.up:
            elsewhere = max(
                sum(self._others.get(backend.name, {}).values()),
                self._floor.get(backend.name, 0),
            )
            recovering = self._awaiting and time.monotonic() < self._awaiting_until
            changed = backend.slots.shared(elsewhere, self._recovery_split if recovering else None)
        else:
            # What the others held when Redis went away stands until the next /slots poll
            # says what the backend is really busy with (the ledger then counts it as
            # traffic around us): a replica holding more than its share finishes those.
            held = sum(self._others.get(backend.name, {}).values())
            changed = backend.slots.shared(min(held, backend.slots.elsewhere), len(self.live))
        if changed:
            self._wakeup()

    # Per-key limits across replicas -----------------------------------------------------

    async def admit_key(
        self, key_id: str, max_concurrent: int | None, per_minute: int | None
    ) -> tuple[str | None, float, str | None]:
        """(lease id, 0, None) when admitted in shared state; (None, retry after, reason)
        when refused there; (None, 0, None) when Redis is away (the caller limits locally)."""
        if not self.up:
            return None, 0.0, None
        lease_id = self.new_lease_id()
        started = time.perf_counter()
        try:
            verdict = await self.store.admit_key(
                key_id, lease_id, max_concurrent, per_minute, self._ttl_ms
            )
        except StateUnavailable as exc:
            self._lost(str(exc))
            return None, 0.0, None
        self.stats.timed(time.perf_counter() - started)
        if not verdict.admitted:
            return None, verdict.retry_after_s, verdict.reason
        if max_concurrent is not None:
            self._flights.setdefault(key_id, set()).add(lease_id)
        return lease_id, 0.0, None

    def release_key(self, key_id: str, lease_id: str) -> None:
        flights = self._flights.get(key_id)
        if flights is None or lease_id not in flights:
            return
        flights.discard(lease_id)
        if not flights:
            del self._flights[key_id]
        if self.up:
            self._spawn(self.store.release_key(key_id, lease_id))

    # Routing and operations ------------------------------------------------------------

    def answered(self, lease: Lease, keys: tuple[str, ...], tokens: int, generated: int) -> None:
        """A backend answered one of ours: what the others should learn of its cache."""
        if self.up and lease.shared_id is not None:
            note = ["answered", self.id, lease.shared_id, lease.backend.name, keys, tokens]
            self._spawn(self.store.publish(_encode([*note, generated])))

    def announce(self, op: str, arg: Any = None) -> None:
        """An operation (drain, add, remove, reload) for every other replica to apply."""
        if self.up:
            self._spawn(self.store.publish(_encode(["op", self.id, op, arg])))
        else:
            log.warning("shared state unreachable: %s applies to this replica only", op)

    # The channel -----------------------------------------------------------------------

    def apply(self, message: bytes) -> None:
        """One event from the channel (ours are skipped: we applied them when we made them)."""
        try:
            event = orjson.loads(message)
            kind, replica = event[0], event[1]
        except (orjson.JSONDecodeError, IndexError, KeyError, TypeError):
            return
        if replica == self.id:
            return
        self.stats.events += 1
        try:
            if kind == "held":
                self._held(replica, event[2], int(event[3]))
            elif kind == "sent":
                self._replay.sent(replica, *event[2:])
            elif kind == "answered":
                self._replay.answered(replica, *event[2:])
            elif kind == "done":
                self._replay.done(replica, event[2])
            elif kind == "op":
                self._apply_op(event[2], event[3])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            log.warning("ignored a malformed %s event from %s (%s)", kind, replica, exc)

    def _held(self, replica: str, backend_name: str, count: int) -> None:
        others = self._others.setdefault(backend_name, {})
        if count > 0:
            others[replica] = count
        else:
            others.pop(replica, None)
        self._floor.pop(backend_name, None)
        backend = self._find(backend_name)
        if backend is not None:
            self._update(backend)

    def _find(self, name: str) -> BackendState | None:
        return next((b for b in self._registry.backends if b.name == name), None)

    # Background work -------------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    async def _listen(self) -> None:
        # Losing the subscription alone does not make Redis away (the next command says
        # whether it is); once subscribed again, a refresh reads what the lost events said.
        first = True
        while True:
            try:
                async for message in self.store.events():
                    if message:
                        self.apply(message)
                    elif not first:
                        self._spawn(self.refresh())
                    first = False
            except StateUnavailable as exc:
                self.last_error = str(exc)
            await asyncio.sleep(_RETRY_S)

    async def _refresh_loop(self) -> None:
        while True:  # start() has made the first refresh
            await asyncio.sleep(self.ttl_s / 3 if self.up else _RETRY_S)
            await self.refresh()

    async def refresh(self) -> None:
        """Extend our leases, read who holds what; after an outage, register what we hold."""
        backends = {b.name for b in self._registry.backends} | set(self._mine)
        leases = {name: sorted(self._mine.get(name, ())) for name in sorted(backends)}
        flights = {key: sorted(ids) for key, ids in self._flights.items()}
        rejoining = not self.up
        started = time.perf_counter()
        head = self._oldest()
        self._head = head
        self._head_seq += 1
        try:
            snapshot = await self.store.refresh(
                self.id,
                self._ttl_ms,
                leases,
                flights,
                head=head,
                head_seq=self._head_seq,
                replace=rejoining,
            )
        except StateUnavailable as exc:
            self._lost(str(exc))
            return
        self.stats.timed(time.perf_counter() - started)
        if rejoining:
            self.up = True
            self._awaiting = set(self.live) - {self.id}
            self._awaiting_until = time.monotonic() + self.ttl_s
            self._recovery_split = len(self.live)
            self._warned = False
            self.last_error = None
            log.warning(
                "shared state reachable at %s: %d replicas share the fleet",
                without_credentials(self.store.url),
                len(snapshot.replicas),
            )
        self._apply_snapshot(snapshot)

    def _apply_snapshot(self, snapshot: Snapshot) -> None:
        gone = set(self.live) - set(snapshot.replicas)
        self.live = tuple(sorted({*snapshot.replicas, self.id}))
        self._awaiting -= set(snapshot.replicas)
        for name, per_replica in snapshot.held.items():
            self._others[name] = {r: n for r, n in per_replica.items() if r != self.id and n}
            self._floor.pop(name, None)
        for backend in self._registry.backends:
            self._update(backend)
        if gone:
            self._replay.forget(gone)

    def _lost(self, error: str) -> None:
        self.last_error = error
        if not self.up and self._warned:
            return
        self.up = False
        self._warned = True
        self.stats.outages += 1
        log.warning(
            "shared state unreachable (%s): serving on local accounting, at most 1/%d of each "
            "backend's slots, until it answers again",
            error,
            len(self.live),
        )
        for backend in self._registry.backends:
            self._update(backend)

    def _spawn(self, call: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._quietly(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _quietly(self, call: Any) -> None:
        try:
            await call
        except StateUnavailable as exc:
            self._lost(str(exc))

    def describe(self) -> dict[str, Any]:
        """For /monitor/data."""
        stats = self.stats
        return {
            "replica": self.id,
            "shared": self.up,
            "state_url": without_credentials(self.store.url),
            "last_error": self.last_error,
            "replicas": list(self.live),
            "claims": stats.claims,
            "claims_refused": stats.refused,
            "claims_deferred": stats.deferred,
            "outages": stats.outages,
            "round_trip_ms_mean": round(1000 * stats.round_trip_s / stats.round_trips, 3)
            if stats.round_trips
            else None,
            "round_trip_ms_max": round(1000 * stats.max_round_trip_s, 3),
            "held_elsewhere": {
                name: sum(per.values()) for name, per in sorted(self._others.items()) if per
            },
        }


def _wall_ms(monotonic_at: float) -> float:
    """A moment of this process's monotonic clock on the wall clock, in whole milliseconds
    (what Redis keeps, so that an unchanged moment compares equal)."""
    return float(round((time.time() - (time.monotonic() - monotonic_at)) * 1000))


def _share(total: int, replicas: int) -> int:
    """One replica's share of a backend's slots while it cannot coordinate: rounded up, so a
    backend is never left unused, and overfilled by less than the number of replicas."""
    return math.ceil(total / max(1, replicas))


def _prompt_fields(lease: Lease) -> list[Any]:
    prompt = lease.cached_prompt
    if prompt is None:
        return [[], [], 0, lease.claim.slot_id]
    return [list(prompt.keys), list(prompt.tokens_at), prompt.length, lease.claim.slot_id]


def _encode(event: list[Any]) -> bytes:
    return orjson.dumps(event)
