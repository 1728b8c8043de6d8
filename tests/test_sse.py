"""Whole events only, and a stream that stops short of its promised end is a failure."""

from __future__ import annotations

import unittest

from llamacpp_ha.sse import BadStream, EventFramer, StreamEnd

CHUNK = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
LAST = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'


class EventFramerTest(unittest.TestCase):
    def test_whole_events_pass_at_once(self) -> None:
        framer = EventFramer(StreamEnd.DONE)
        self.assertEqual(framer.feed(CHUNK + CHUNK), CHUNK + CHUNK)

    def test_a_split_event_waits_for_its_end(self) -> None:
        framer = EventFramer(StreamEnd.DONE)
        self.assertEqual(framer.feed(CHUNK + CHUNK[:10]), CHUNK)
        self.assertEqual(framer.feed(CHUNK[10:-1]), b"")
        self.assertEqual(framer.feed(b"\n"), CHUNK)

    def test_every_byte_boundary(self) -> None:
        stream = CHUNK + b": keep-alive\n\n" + LAST + b"data: [DONE]\n\n"
        for cut in range(1, len(stream)):
            framer = EventFramer(StreamEnd.DONE)
            relayed = framer.feed(stream[:cut]) + framer.feed(stream[cut:])
            self.assertEqual(relayed, stream, cut)
            framer.finish()
            self.assertEqual(framer.usage.prompt_tokens, 5)

    def test_crlf_events(self) -> None:
        framer = EventFramer(StreamEnd.DONE)
        event = CHUNK.replace(b"\n", b"\r\n")
        self.assertEqual(
            framer.feed(event + b"data: [DONE]\r\n\r\n"), event + b"data: [DONE]\r\n\r\n"
        )
        framer.finish()

    def test_end_in_the_middle_of_an_event_is_bad(self) -> None:
        framer = EventFramer(StreamEnd.DONE)
        framer.feed(CHUNK + b"data: [DONE]\n\n" + CHUNK[:12])
        with self.assertRaises(BadStream):
            framer.finish()

    def test_openai_stream_without_done_is_truncated(self) -> None:
        framer = EventFramer(StreamEnd.DONE)
        framer.feed(CHUNK + LAST)
        with self.assertRaises(BadStream) as caught:
            framer.finish()
        self.assertIn("[DONE]", str(caught.exception))

    def test_native_stream_ends_with_stop(self) -> None:
        framer = EventFramer(StreamEnd.STOP)
        framer.feed(b'data: {"content":"a","stop":false}\n\n')
        with self.assertRaises(BadStream):
            framer.finish()
        framer.feed(b'data: {"content":"","stop":true,"timings":{"cache_n":3,"prompt_n":2}}\n\n')
        framer.finish()
        self.assertEqual((framer.usage.prompt_tokens, framer.usage.cached_tokens), (5, 3))

    def test_anthropic_stream_ends_with_message_stop(self) -> None:
        framer = EventFramer(StreamEnd.MESSAGE_STOP)
        framer.feed(b'event: message_delta\ndata: {"type":"message_delta"}\n\n')
        with self.assertRaises(BadStream):
            framer.finish()
        framer.feed(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        framer.finish()

    def test_an_event_that_is_not_json_is_a_fault_after_the_good_ones(self) -> None:
        framer = EventFramer(StreamEnd.DONE)
        relayed = framer.feed(CHUNK + b'data: {"choices":[\n\n' + CHUNK)
        self.assertEqual(relayed, CHUNK)
        self.assertIsNotNone(framer.fault)
        self.assertEqual(framer.feed(b"data: [DONE]\n\n"), b"")
        with self.assertRaises(BadStream):
            framer.finish()

    def test_no_promised_end_ends_whenever(self) -> None:
        framer = EventFramer(None)
        framer.feed(CHUNK)
        framer.finish()
