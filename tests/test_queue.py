from __future__ import annotations

import time
import unittest

from fleet import _entry
from llamacpp_ha.policies import RoutingRequest
from llamacpp_ha.queue import QueueEntry, RequestQueue


class QueueTest(unittest.IsolatedAsyncioTestCase):
    def test_entry_has_no_future_by_default(self) -> None:
        self.assertIsNone(QueueEntry(routing=RoutingRequest(model=None)).future)

    async def test_helper_attaches_future(self) -> None:
        entry = _entry()
        self.assertIsNotNone(entry.future)
        assert entry.future is not None  # narrows the type, which assertIsNotNone does not
        self.assertFalse(entry.future.done())

    async def test_fifo_order(self) -> None:
        queue = RequestQueue()
        entries = [_entry() for _ in range(5)]
        for entry in entries:
            queue.put(entry)
        self.assertEqual(list(queue), entries)
        self.assertEqual(len(queue), 5)

    async def test_remove_from_middle(self) -> None:
        queue = RequestQueue()
        a, b, c = _entry(), _entry(), _entry()
        for entry in (a, b, c):
            queue.put(entry)
        queue.remove(b)
        self.assertEqual(list(queue), [a, c])
        self.assertNotIn(b, queue)
        queue.remove(b)  # idempotent
        self.assertEqual(len(queue), 2)

    async def test_put_front(self) -> None:
        queue = RequestQueue()
        a, b = _entry(), _entry()
        queue.put(a)
        queue.put(b, front=True)
        self.assertEqual(list(queue), [b, a])

    async def test_first_is_the_entry_served_next(self) -> None:
        queue = RequestQueue()
        self.assertIsNone(queue.first())
        a, b, c = _entry(), _entry(), _entry()
        queue.put(a)
        queue.put(b)
        self.assertIs(queue.first(), a)
        queue.put(c, front=True)
        self.assertIs(queue.first(), c)
        queue.remove(c)
        self.assertIs(queue.first(), a)

    async def test_iteration_tolerates_removal(self) -> None:
        queue = RequestQueue()
        entries = [_entry() for _ in range(3)]
        for entry in entries:
            queue.put(entry)
        for entry in queue:
            queue.remove(entry)
        self.assertEqual(len(queue), 0)

    async def test_equal_looking_entries_are_distinct(self) -> None:
        queue = RequestQueue()
        routing = RoutingRequest(model="m")
        a, b = _entry(routing=routing), _entry(routing=routing)
        queue.put(a)
        queue.put(b)
        queue.remove(a)
        self.assertEqual(list(queue), [b])

    async def test_oldest_wait(self) -> None:
        queue = RequestQueue()
        self.assertEqual(queue.oldest_wait_s(), 0.0)
        queue.put(_entry(enqueued_at=time.monotonic() - 2.0))
        queue.put(_entry())
        self.assertGreaterEqual(queue.oldest_wait_s(), 2.0)
