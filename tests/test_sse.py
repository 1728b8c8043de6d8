"""Whole events only, and a stream that stops short of its promised end is a failure."""

from __future__ import annotations

import unittest

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from llamacpp_ha.resume import Transcript
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


# A chat stream as llama-server writes it (the shared sample chat-stream.txt): every event of
# the same id, created and model; the role first, then one event per token, the finish, usage.
_IDENT = {"created": 1795788220, "id": "chatcmpl-ytNaAN9K", "model": "tiny-llama"}


def _chat_event(delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"finish_reason": finish, "index": 0, "delta": delta}
    event = {"choices": [choice], **_IDENT, "object": "chat.completion.chunk"}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _chat_stream(texts: list[str], odd: dict[int, dict[str, object]]) -> bytes:
    """The role, a token per text (or, at the indexes of `odd`, a delta of another shape), the
    finish, usage, [DONE]."""
    events = [_chat_event({"role": "assistant", "content": None})]
    events += [_chat_event(odd.get(i, {"content": text})) for i, text in enumerate(texts)]
    events.append(_chat_event({}, finish="stop"))
    events.append(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n')
    return b"".join(events) + b"data: [DONE]\n\n"


def _read_whole(stream: bytes) -> Transcript:
    """What a transcript reads from the stream with every event parsed."""
    transcript = Transcript("/v1/chat/completions", {"stream": True})
    transcript.feed(stream)
    return transcript


_ODD_DELTAS = st.sampled_from(
    [
        {"content": "x", "role": "assistant"},
        {"reasoning_content": "hm"},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
        {"content": None},
    ]
)


class TokenShapeTest(unittest.TestCase):
    """A token event recognised by its bytes (the shape of the tokens before it) reads exactly as
    one parsed whole, and only an event of that shape is taken for a token."""

    @settings(max_examples=300, deadline=None)
    @given(
        texts=st.lists(st.text(max_size=12), max_size=30),
        odd=st.dictionaries(st.integers(0, 29), _ODD_DELTAS, max_size=4),
        cuts=st.lists(st.integers(1, 4000), max_size=6),
    )
    def test_the_transcript_reads_what_parsing_every_event_reads(
        self, texts: list[str], odd: dict[int, dict[str, object]], cuts: list[int]
    ) -> None:
        stream = _chat_stream(texts, odd)
        transcript = Transcript("/v1/chat/completions", {"stream": True})
        framer = EventFramer(StreamEnd.DONE, transcript)
        relayed, at = b"", 0
        for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
            relayed += framer.feed(stream[at:cut])
            at = max(at, cut)
        framer.finish()
        self.assertEqual(relayed, stream)
        whole = _read_whole(stream)
        self.assertEqual(transcript.text, whole.text)
        self.assertEqual(transcript.tokens, whole.tokens)
        self.assertEqual((transcript.blocker, transcript.finished), (whole.blocker, whole.finished))
        self.assertEqual(transcript.ident, whole.ident)
        self.assertEqual(framer.usage.prompt_tokens, 5)

    def test_an_event_of_the_same_bytes_around_more_than_one_string_is_parsed_whole(self) -> None:
        token = _chat_event({"content": "a"})
        head, tail = token.split(b'"a"')
        transcript = Transcript("/v1/chat/completions", {"stream": True})
        framer = EventFramer(StreamEnd.DONE, transcript)
        # Good JSON, but a delta of two fields: a tool call under way is seen, not taken for text.
        sneaky = head + b'"b","tool_calls":[{"index":0}]' + tail
        self.assertEqual(framer.feed(token + sneaky), token + sneaky)
        self.assertEqual(transcript.text, ["a", "b"])
        self.assertEqual(transcript.blocker, "a tool call was under way")
        # Not JSON at all, though its head and tail are a token's: the backend's fault.
        for broken in (b'"c" "d"', b'"e', b'"f\\"', b"g"):
            framer = EventFramer(StreamEnd.DONE, Transcript("/v1/chat/completions", {}))
            garbled = head + broken + tail
            self.assertEqual(framer.feed(token + garbled + token), token, broken)
            self.assertIsNotNone(framer.fault, broken)

    def test_a_backend_whose_tokens_differ_in_more_than_their_text_is_read_whole(self) -> None:
        transcript = Transcript("/v1/chat/completions", {"stream": True})
        framer = EventFramer(StreamEnd.DONE, transcript)
        events = [
            b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"%d"}}],'
            b'"created":%d}\n\n' % (i, i)
            for i in range(20)
        ]
        self.assertEqual(framer.feed(b"".join(events)), b"".join(events))
        self.assertEqual(transcript.text, [str(i) for i in range(20)])

    def test_tokens_after_the_first_are_read_by_their_text_alone(self) -> None:
        calls: list[object] = []

        class Recording:
            def read(self, event: dict[str, object] | None) -> None:
                calls.append(event)

            def read_text(self, text: str) -> None:
                calls.append(text)

        stream = _chat_stream(["a", "b", 'c"\\'], {})
        framer = EventFramer(StreamEnd.DONE, Recording())
        self.assertEqual(framer.feed(stream), stream)
        framer.finish()
        parsed = [c for c in calls if not isinstance(c, str)]
        self.assertEqual(calls[2:4], ["b", 'c"\\'])  # after the role and the first token
        self.assertEqual(len(parsed), 5)  # role, first token, finish, usage, [DONE] (None)
        self.assertIsNone(parsed[-1])
