"""The endpoints that occupy a slot: chat, completions, Anthropic messages, embeddings.

Each request becomes a ``GenTask`` submitted to the engine; the handler streams the task's tokens
as the engine produces them and cancels the task in a ``finally``, so a client that goes away
frees its slot at once. Faults that concern generation (hang, 500, garbage, bad status line,
crash, stall) are applied here; embeddings count as generation for faults.
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from array import array
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from llamacpp_sim import shapes
from llamacpp_sim.config import SimConfig
from llamacpp_sim.engine import Engine, GenTask
from llamacpp_sim.faults import Fault
from llamacpp_sim.generator import reply_pieces
from llamacpp_sim.recording import REC_KEY, RecordedRequest
from llamacpp_sim.shapes import dumps, error_body
from llamacpp_sim.stream import (
    GARBAGE,
    SseWriter,
    break_connection,
    forever,
    write_bad_status_line,
)
from llamacpp_sim.template import TemplateError, render_anthropic, render_chat
from llamacpp_sim.tokenizer import N_VOCAB, Tokenizer
from llamacpp_sim.wire import HEADERS, ApiError, json_response, read_json

_ID_ALPHABET = string.ascii_letters + string.digits


class _Job:
    """A submitted task with its reply text and the request it serves."""

    def __init__(
        self, task: GenTask, pieces: list[str], finish: str, model: str, rec: RecordedRequest
    ) -> None:
        self.task = task
        self.pieces = pieces
        self.finish = finish
        self.model = model
        self.rec = rec

    @property
    def text(self) -> str:
        return "".join(self.pieces[: self.task.n_generated])

    async def new_tokens(self) -> AsyncIterator[int]:
        """Indices of generated tokens, as the engine produces them."""
        sent = 0
        task = self.task
        while True:
            while sent < task.n_generated:
                yield sent
                sent += 1
            if task.done:
                return
            task.changed.clear()
            await task.changed.wait()

    async def wait_done(self) -> None:
        async for _ in self.new_tokens():
            pass


class Inference:
    """Generation and embedding endpoints of one ``SimBackend``, over its engine."""

    def __init__(self, config: SimConfig, engine: Engine, tokenizer: Tokenizer) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.profile = config.resolved_profile()
        self._rng = random.Random()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat),
            web.post("/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/completions", self.completions),
            web.post("/completion", self.native_completion),
            web.post("/v1/messages", self.messages),
            web.post("/v1/messages/count_tokens", self.count_tokens),
            web.post("/v1/embeddings", self.oai_embeddings),
            web.post("/embeddings", self.native_embeddings),
            web.post("/embedding", self.native_embeddings),
        ]

    def _new_id(self, prefix: str) -> str:
        return prefix + "".join(self._rng.choices(_ID_ALPHABET, k=32))

    # -- faults -----------------------------------------------------------------------------

    async def _gate(self, request: web.Request, stream: bool) -> web.StreamResponse | None:
        fault: Fault | None = request[REC_KEY].fault
        if fault is None:
            return None
        rec: RecordedRequest = request[REC_KEY]
        if fault.garbage_status_line:
            rec.outcome = "fault"
            await write_bad_status_line(request)
        if fault.hang:
            rec.outcome = "fault"
            await forever()
        if fault.error_500:
            rec.outcome = "fault"
            return json_response(
                error_body(500, "simulated fault: internal server error", "server_error"), 500
            )
        if fault.garbage:
            rec.outcome = "fault"
            return web.Response(
                body=GARBAGE,
                headers={
                    **HEADERS,
                    "Content-Type": "text/event-stream" if stream else "application/json",
                },
            )
        return None

    def _writer(self, request: web.Request, job: _Job) -> SseWriter:
        def mark() -> None:
            job.rec.outcome = "fault"

        def pause() -> None:
            job.task.paused = True

        keepalive_s = max(0.5 / self.config.time_scale, 0.01)
        return SseWriter(request, request[REC_KEY].fault, keepalive_s, mark, pause)

    async def _finish_unstreamed(self, request: web.Request, job: _Job) -> None:
        fault: Fault | None = request[REC_KEY].fault
        if fault is not None and fault.stall_after_chunks is not None:
            job.rec.outcome = "fault"
            job.task.paused = True
            await forever()
        await job.wait_done()
        if job.task.error is not None:
            raise ApiError(500, job.task.error, "server_error")
        if fault is not None and fault.crash_after_chunks is not None:
            job.rec.outcome = "fault"
            self.engine.cancel(job.task)
            break_connection(request, fault.crash_mode)
            await forever()

    # -- building tasks ---------------------------------------------------------------------

    def _start_job(
        self,
        request: web.Request,
        body: dict[str, Any],
        prompt_in: str | list[int],
        limit_keys: tuple[str, ...],
    ) -> _Job:
        cfg = self.config
        tokenizer = self.tokenizer
        # Token ids are taken as they are, without a BOS, as llama-server takes them.
        if isinstance(prompt_in, str):
            prompt = tokenizer.tokenize(prompt_in, add_bos=True)
        else:
            prompt = list(prompt_in)
        self._check_context(len(prompt))
        limit: int | None = None
        for key in limit_keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ApiError(400, f"'{key}' must be an integer", "invalid_request_error")
            limit = value if value >= 0 else None
            break
        room = cfg.n_ctx - len(prompt)
        if limit is None:
            n_predict, finish = cfg.default_max_tokens, "stop"
        else:
            n_predict, finish = limit, "length"
        if n_predict > room:
            n_predict, finish = room, "length"
        pieces = reply_pieces(prompt, n_predict) if n_predict > 0 else []
        rec: RecordedRequest = request[REC_KEY]
        task = GenTask(
            prompt=prompt,
            reply=[tokenizer.piece_id(p) for p in pieces],
            id_slot=self._id_slot(body),
            cache_prompt=body.get("cache_prompt", True) is not False,
            on_start=_recorder(rec),
        )
        model = body.get("model")
        job = _Job(task, pieces, finish, model if isinstance(model, str) else cfg.model, rec)
        self.engine.submit(task)
        return job

    def _check_context(self, n_prompt: int) -> None:
        n_ctx = self.config.n_ctx
        if n_prompt >= n_ctx:
            raise ApiError(
                400,
                f"request ({n_prompt} tokens) exceeds the available context size "
                f"({n_ctx} tokens), try increasing it",
                "exceed_context_size_error",
                n_prompt_tokens=n_prompt,
                n_ctx=n_ctx,
            )

    def _id_slot(self, body: dict[str, Any]) -> int | None:
        value = body.get("id_slot", -1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, "'id_slot' must be an integer", "invalid_request_error")
        if value < 0:
            return None
        if value >= self.config.slots:
            raise ApiError(400, f"invalid id_slot {value}", "invalid_request_error")
        return value

    # -- endpoints --------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        stream = bool(body.get("stream", False))
        blocked = await self._gate(request, stream)
        if blocked is not None:
            return blocked
        try:
            prompt_text = render_chat(body.get("messages"))
        except TemplateError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from exc
        job = self._start_job(
            request, body, prompt_text, ("max_completion_tokens", "max_tokens", "n_predict")
        )
        cmpl_id = self._new_id("chatcmpl-")
        try:
            if not stream:
                await self._finish_unstreamed(request, job)
                return json_response(
                    shapes.chat_completion(job.task, job.text, job.finish, job.model, cmpl_id)
                )
            writer = self._writer(request, job)
            role_sent = False
            role = {"role": "assistant", "content": None}
            async for i in job.new_tokens():
                if not role_sent:
                    await writer.send_data(dumps(shapes.chat_chunk(role, None, job.model, cmpl_id)))
                    role_sent = True
                delta = {"content": job.pieces[i]}
                await writer.send_data(dumps(shapes.chat_chunk(delta, None, job.model, cmpl_id)))
            if job.task.error is not None:
                return await _stream_error(writer, job.task.error, anthropic=False)
            if not role_sent:
                await writer.send_data(dumps(shapes.chat_chunk(role, None, job.model, cmpl_id)))
            last = shapes.chat_chunk({}, job.finish, job.model, cmpl_id)
            return await _end_openai_stream(
                writer, body, job, last, "chat.completion.chunk", cmpl_id
            )
        finally:
            self.engine.cancel(job.task)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        stream = bool(body.get("stream", False))
        blocked = await self._gate(request, stream)
        if blocked is not None:
            return blocked
        job = self._start_job(request, body, _prompt(body), ("max_tokens", "n_predict"))
        cmpl_id = self._new_id("cmpl-")
        try:
            if not stream:
                await self._finish_unstreamed(request, job)
                return json_response(
                    shapes.text_completion(
                        job.task, job.text, job.finish, job.model, cmpl_id, final=True
                    )
                )
            writer = self._writer(request, job)
            async for i in job.new_tokens():
                chunk = shapes.text_completion(
                    job.task, job.pieces[i], None, job.model, cmpl_id, final=False
                )
                await writer.send_data(dumps(chunk))
            if job.task.error is not None:
                return await _stream_error(writer, job.task.error, anthropic=False)
            last = shapes.text_completion(job.task, "", job.finish, job.model, cmpl_id, False)
            return await _end_openai_stream(writer, body, job, last, "text_completion", cmpl_id)
        finally:
            self.engine.cancel(job.task)

    async def native_completion(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        stream = bool(body.get("stream", False))
        blocked = await self._gate(request, stream)
        if blocked is not None:
            return blocked
        prompt = _prompt(body)
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.detokenize(prompt)
        job = self._start_job(request, body, prompt, ("n_predict", "max_tokens"))
        stop_type = "limit" if job.finish == "length" else "eos"
        try:
            if not stream:
                await self._finish_unstreamed(request, job)
                return json_response(
                    shapes.native_completion(
                        job.task, job.text, stop_type, job.model, prompt_text, stream=False
                    )
                )
            writer = self._writer(request, job)
            async for i in job.new_tokens():
                chunk = shapes.native_chunk(job.task, job.pieces[i], job.task.reply[i])
                await writer.send_data(dumps(chunk))
            if job.task.error is not None:
                return await _stream_error(writer, job.task.error, anthropic=False)
            final = shapes.native_completion(
                job.task, "", stop_type, job.model, prompt_text, stream=True
            )
            await writer.send_data(dumps(final))
            return await writer.finish()
        finally:
            self.engine.cancel(job.task)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        stream = bool(body.get("stream", False))
        blocked = await self._gate(request, stream)
        if blocked is not None:
            return blocked
        try:
            prompt_text = render_anthropic(body)
        except TemplateError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from exc
        job = self._start_job(request, body, prompt_text, ("max_tokens",))
        msg_id = self._new_id("chatcmpl-")
        stop_reason = "max_tokens" if job.finish == "length" else "end_turn"
        try:
            if not stream:
                await self._finish_unstreamed(request, job)
                return json_response(
                    shapes.anthropic_message(job.task, job.text, stop_reason, job.model, msg_id)
                )
            writer = self._writer(request, job)
            started = False
            async for i in job.new_tokens():
                if not started:
                    await self._anthropic_start(writer, job, msg_id)
                    started = True
                delta = {"type": "text_delta", "text": job.pieces[i]}
                await writer.send_event(
                    "content_block_delta",
                    dumps({"type": "content_block_delta", "index": 0, "delta": delta}),
                )
            if job.task.error is not None:
                return await _stream_error(writer, job.task.error, anthropic=True)
            if not started:
                await self._anthropic_start(writer, job, msg_id)
            await writer.send_event(
                "content_block_stop", dumps({"type": "content_block_stop", "index": 0})
            )
            message_delta = {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": shapes.anthropic_usage(job.task),
            }
            await writer.send_event("message_delta", dumps(message_delta))
            await writer.send_event("message_stop", dumps({"type": "message_stop"}))
            return await writer.finish()
        finally:
            self.engine.cancel(job.task)

    async def _anthropic_start(self, writer: SseWriter, job: _Job, msg_id: str) -> None:
        message: dict[str, Any] = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": job.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**shapes.anthropic_usage(job.task), "output_tokens": 0},
        }
        await writer.send_event(
            "message_start", dumps({"type": "message_start", "message": message})
        )
        block = {"type": "text", "text": ""}
        await writer.send_event(
            "content_block_start",
            dumps({"type": "content_block_start", "index": 0, "content_block": block}),
        )

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        try:
            prompt_text = render_anthropic(body)
        except TemplateError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from exc
        n = len(self.tokenizer.tokenize(prompt_text, add_bos=True))
        return json_response({"input_tokens": n})

    async def oai_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._embeddings(request, oai=True)

    async def native_embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._embeddings(request, oai=False)

    async def _embeddings(self, request: web.Request, oai: bool) -> web.StreamResponse:
        if not self.config.embeddings:
            raise ApiError(
                501,
                "This server does not support embeddings. Start it with `--embeddings`",
                "not_supported_error",
            )
        body = await read_json(request)
        blocked = await self._gate(request, stream=False)
        if blocked is not None:
            return blocked
        inputs = self._embedding_inputs(body.get("input", body.get("content")))
        for tokens in inputs:
            self._check_context(len(tokens))
        rec: RecordedRequest = request[REC_KEY]
        task = GenTask(
            prompt=[t for tokens in inputs for t in tokens],
            reply=[],
            id_slot=self._id_slot(body),
            stateless=True,
            on_start=_recorder(rec),
        )
        self.engine.submit(task)
        model = body.get("model")
        job = _Job(task, [], "stop", model if isinstance(model, str) else "", rec)
        try:
            await self._finish_unstreamed(request, job)
        finally:
            self.engine.cancel(task)
        dim = self.profile.embedding_dim
        vectors = [_embedding(tokens, dim) for tokens in inputs]
        if not oai:
            return json_response(
                [{"index": i, "embedding": [vec]} for i, vec in enumerate(vectors)]
            )
        n_tokens = sum(len(t) for t in inputs)
        return json_response(
            {
                "model": job.model or self.config.model,
                "object": "list",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [
                    {"embedding": vec, "index": i, "object": "embedding"}
                    for i, vec in enumerate(vectors)
                ],
            }
        )

    def _embedding_inputs(self, value: Any) -> list[list[int]]:
        tokenizer = self.tokenizer
        if isinstance(value, str):
            return [tokenizer.tokenize(value, add_bos=True)]
        if isinstance(value, list) and value:
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return [list(value)]
            out: list[list[int]] = []
            for item in value:
                if isinstance(item, str):
                    out.append(tokenizer.tokenize(item, add_bos=True))
                elif isinstance(item, list) and all(isinstance(v, int) for v in item):
                    out.append(list(item))
                else:
                    break
            else:
                return out
        raise ApiError(
            400, "'input' must be a string or an array of strings", "invalid_request_error"
        )


def _recorder(rec: RecordedRequest) -> Callable[[GenTask], None]:
    def on_start(task: GenTask) -> None:
        rec.slot_id = task.slot_id
        rec.started_at = task.started_at

    return on_start


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _prompt(body: dict[str, Any]) -> str | list[int]:
    """A prompt as text, or as token ids (``[12, 34, ...]``, or ``[[12, 34, ...]]``)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        if not all(0 <= t < N_VOCAB for t in prompt):
            raise ApiError(400, "Prompt contains invalid tokens", "invalid_request_error")
        return list(prompt)
    raise ApiError(
        400, "'prompt' must be a string or an array of token ids", "invalid_request_error"
    )


def _embedding(tokens: list[int], dim: int) -> list[float]:
    seed = hashlib.blake2b(array("q", tokens).tobytes(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(seed, "big"))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


async def _stream_error(writer: SseWriter, message: str, anthropic: bool) -> web.StreamResponse:
    """A failure after the stream began, as llama-server sends it: an error event, no [DONE]."""
    error = error_body(500, message, "server_error")
    if anthropic:
        await writer.send_event("error", dumps(error["error"]))
    else:
        await writer.send_data(dumps(error))
    return await writer.finish()


async def _end_openai_stream(
    writer: SseWriter,
    body: dict[str, Any],
    job: _Job,
    last: dict[str, Any],
    object_name: str,
    cmpl_id: str,
) -> web.StreamResponse:
    """The last chunks as llama-server sends them: `timings` ride on the final chunk, or on a
    separate usage chunk when the client asked for `stream_options.include_usage`."""
    if _include_usage(body):
        await writer.send_data(dumps(last))
        usage = shapes.usage_chunk(job.task, object_name, job.model, cmpl_id)
        await writer.send_data(dumps(usage))
    else:
        last["timings"] = shapes.timings(job.task)
        await writer.send_data(dumps(last))
    await writer.send_data("[DONE]")
    return await writer.finish()
