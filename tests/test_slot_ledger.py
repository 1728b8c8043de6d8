from __future__ import annotations

import asyncio
import unittest

from llamacpp_ha.slot_ledger import Claim, SlotTracker


class SlotTrackerTest(unittest.IsolatedAsyncioTestCase):
    def test_starts_with_no_capacity_until_observed(self) -> None:
        tracker = SlotTracker()
        self.assertEqual(tracker.free, 0)
        self.assertFalse(tracker.try_claim())

    def test_claims_up_to_total(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=2, busy_on_backend=0)
        self.assertTrue(tracker.try_claim())
        self.assertTrue(tracker.try_claim())
        self.assertFalse(tracker.try_claim())
        self.assertEqual((tracker.in_flight, tracker.free, tracker.busy), (2, 0, 2))

    async def test_release_frees_and_notifies(self) -> None:
        calls: list[int] = []
        tracker = SlotTracker(on_release=lambda: calls.append(tracker.free))
        tracker.observe(total=1, busy_on_backend=0)
        claim = tracker.try_claim()
        self.assertTrue(claim)
        assert claim is not None
        await tracker.release(claim)
        # The callback already sees the freed slot: release is done before anyone is told.
        self.assertEqual(calls, [1])
        self.assertTrue(tracker.try_claim())

    async def test_release_without_claim_is_an_error(self) -> None:
        tracker = SlotTracker()
        with self.assertRaises(RuntimeError):
            await tracker.release(Claim(""))

    def test_foreign_busy_slots_count_as_busy(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=4, busy_on_backend=3)
        self.assertEqual((tracker.external_busy, tracker.free), (3, 1))
        self.assertTrue(tracker.try_claim())
        self.assertFalse(tracker.try_claim())

    def test_our_own_requests_are_not_counted_twice(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=4, busy_on_backend=0)
        tracker.try_claim()
        tracker.try_claim()
        tracker.observe(total=4, busy_on_backend=2)
        self.assertEqual((tracker.external_busy, tracker.free), (0, 2))

    def test_backend_not_yet_busy_with_ours_is_no_spare_capacity(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=2, busy_on_backend=0)
        tracker.try_claim()
        tracker.try_claim()
        tracker.observe(total=2, busy_on_backend=0)  # ours have not started there yet
        self.assertEqual(tracker.free, 0)

    async def test_a_read_asked_before_a_release_does_not_hold_the_freed_slot(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=1, busy_on_backend=0)
        claim = tracker.try_claim()
        assert claim is not None
        asked = tracker.freed
        await tracker.release(claim)
        # The backend answered while our request still held its slot.
        tracker.observe(total=1, busy_on_backend=1, freed_when_asked=asked)
        self.assertEqual((tracker.external_busy, tracker.free), (0, 1))
        # A read asked after the release that still finds the slot busy: traffic around us.
        tracker.observe(total=1, busy_on_backend=1, freed_when_asked=tracker.freed)
        self.assertEqual((tracker.external_busy, tracker.free), (1, 0))

    def test_a_read_asked_before_another_replica_freed_a_slot_does_not_hold_it(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=2, busy_on_backend=0)
        tracker.shared(elsewhere=2, split=None)
        asked = tracker.freed
        tracker.shared(elsewhere=1, split=None)  # another replica's request ended
        tracker.observe(total=2, busy_on_backend=2, freed_when_asked=asked)
        self.assertEqual((tracker.external_busy, tracker.free), (0, 1))
        tracker.observe(total=2, busy_on_backend=2, freed_when_asked=tracker.freed)
        self.assertEqual((tracker.external_busy, tracker.free), (1, 0))

    async def test_traffic_around_us_that_grew_during_a_racing_read_still_counts(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=4, busy_on_backend=0)
        claim = tracker.try_claim()
        assert claim is not None
        asked = tracker.freed
        await tracker.release(claim)
        # Busy 3: ours (ended or not) and at least two requests that reached it around us.
        tracker.observe(total=4, busy_on_backend=3, freed_when_asked=asked)
        self.assertEqual((tracker.external_busy, tracker.free), (2, 2))
        # The traffic around us ends; a read racing another release of ours shows 1 busy:
        # ours, or one of theirs. It stays counted, as before the race, until a clean read.
        claim = tracker.try_claim()
        assert claim is not None
        asked = tracker.freed
        await tracker.release(claim)
        tracker.observe(total=4, busy_on_backend=1, freed_when_asked=asked)
        self.assertEqual(tracker.external_busy, 1)
        tracker.observe(total=4, busy_on_backend=0, freed_when_asked=tracker.freed)
        self.assertEqual(tracker.external_busy, 0)

    def test_shrinking_backend_never_overfills(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=4, busy_on_backend=0)
        for _ in range(4):
            tracker.try_claim()
        tracker.observe(total=2, busy_on_backend=4)  # restarted with fewer slots
        self.assertEqual(tracker.free, 0)
        self.assertEqual(tracker.busy, 2)

    def test_observe_reports_capacity_change(self) -> None:
        tracker = SlotTracker()
        self.assertTrue(tracker.observe(total=2, busy_on_backend=0))
        self.assertFalse(tracker.observe(total=2, busy_on_backend=0))
        self.assertTrue(tracker.observe(total=2, busy_on_backend=1))

    async def test_wait_idle_returns_after_last_release(self) -> None:
        tracker = SlotTracker()
        tracker.observe(total=2, busy_on_backend=0)
        first, second = tracker.try_claim(), tracker.try_claim()
        assert first is not None
        assert second is not None
        waiter = asyncio.create_task(tracker.wait_idle())
        await tracker.release(first)
        await asyncio.sleep(0)
        self.assertFalse(waiter.done())
        await tracker.release(second)
        await asyncio.wait_for(waiter, 1)

    async def test_a_pinned_slot_is_claimed_once(self) -> None:
        tracker = SlotTracker("b")
        tracker.observe(total=2, busy_on_backend=0)
        claim = tracker.try_claim(slot_id=1)
        assert claim is not None
        self.assertEqual((claim.backend, claim.slot_id), ("b", 1))
        self.assertIsNone(tracker.try_claim(slot_id=1))  # held
        self.assertIsNone(tracker.try_claim(slot_id=2))  # no such slot
        other = tracker.try_claim()
        self.assertIsNotNone(other)
        self.assertIsNone(tracker.try_claim(slot_id=0))  # no slot free
        await tracker.release(claim)
        self.assertIsNotNone(tracker.try_claim(slot_id=1))
