"""JSON bodies in the exact shapes of the captured llama-server (``llama-server-samples/``)."""

from __future__ import annotations

import json
import time
from typing import Any

from llamacpp_sim.engine import EngineStats, GenTask, Slot
from llamacpp_sim.template import CHAT_TEMPLATE, GENERATION_PROMPT
from llamacpp_sim.tokenizer import BOS_PIECE, EOS_PIECE, N_VOCAB

BUILD_INFO = "b0-sim"

SAMPLING_PARAMS: dict[str, Any] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0,
    "adaptive_decay": 0.8999999761581421,
    "max_tokens": -1,
    "n_predict": -1,
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": False,
    "stream": False,
    "n_probs": 0,
    "min_keep": 0,
    "chat_format": "Content-only",
    "reasoning_format": "none",
    "reasoning_in_content": False,
    "generation_prompt": "",
    "samplers": [
        "penalties",
        "dry",
        "top_n_sigma",
        "top_k",
        "typ_p",
        "top_p",
        "min_p",
        "xtc",
        "temperature",
    ],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "backend_sampling": False,
    "lora": [],
}


def dumps(obj: Any) -> str:
    # nlohmann::json writes compact UTF-8, not ASCII escapes.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_body(code: int, message: str, err_type: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": err_type, **extra}}


LOADING = error_body(503, "Loading model", "unavailable_error")


def props(
    model: str, n_slots: int, n_ctx: int, slots_endpoint: bool, model_path: str
) -> dict[str, Any]:
    return {
        "default_generation_settings": {"params": dict(SAMPLING_PARAMS), "n_ctx": n_ctx},
        "total_slots": n_slots,
        "model_alias": model,
        "model_ftype": "all F32",
        "model_path": model_path,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media__>",
        "endpoint_slots": slots_endpoint,
        "endpoint_props": False,
        "endpoint_metrics": True,
        "ui": True,
        "ui_settings": {},
        "chat_template": CHAT_TEMPLATE,
        "chat_template_caps": {
            "supports_object_arguments": False,
            "supports_parallel_tool_calls": False,
            "supports_preserve_reasoning": False,
            "supports_reasoning_effort": False,
            "supports_string_content": True,
            "supports_system_role": True,
            "supports_tool_calls": False,
            "supports_tools": False,
            "supports_typed_content": False,
        },
        "bos_token": BOS_PIECE,
        "eos_token": EOS_PIECE,
        "build_info": BUILD_INFO,
        "is_sleeping": False,
        "cors_proxy_enabled": False,
    }


def slot_entry(slot: Slot, lie: bool) -> dict[str, Any]:
    processing = slot.task is not None and not lie
    entry: dict[str, Any] = {
        "id": slot.id,
        "n_ctx": slot.n_ctx,
        "speculative": False,
        "is_processing": processing,
    }
    task = slot.task or slot.last_task
    if task is None:
        return entry
    n_predict = len(task.reply)
    entry.update(
        {
            "id_task": task.task_id,
            "n_prompt_tokens": task.n_prompt if processing else 0,
            "n_prompt_tokens_processed": task.n_past - task.cache_n if processing else 0,
            "n_prompt_tokens_cache": task.cache_n if processing else 0,
            "params": {
                **SAMPLING_PARAMS,
                "max_tokens": n_predict,
                "n_predict": n_predict,
                "chat_format": "peg-native",
                "generation_prompt": GENERATION_PROMPT,
            },
            "next_token": [
                {
                    "has_next_token": processing,
                    "has_new_line": False,
                    "n_remain": n_predict - task.n_generated if processing else -1,
                    "n_decoded": task.n_generated if processing else 0,
                }
            ],
        }
    )
    return entry


def models(model: str, aliases: tuple[str, ...], n_ctx: int, created: int) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": model,
                "model": model,
                "modified_at": "",
                "size": "",
                "digest": "",
                "type": "model",
                "description": "",
                "tags": [""],
                "capabilities": ["completion"],
                "parameters": "",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "",
                    "families": [""],
                    "parameter_size": "",
                    "quantization_level": "",
                },
            }
        ],
        "object": "list",
        "data": [
            {
                "id": model,
                "aliases": [model, *[a for a in aliases if a != model]],
                "tags": [],
                "object": "model",
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "created": created,
                "owned_by": "llamacpp",
                "meta": {
                    "vocab_type": 2,
                    "n_vocab": N_VOCAB,
                    "n_ctx": n_ctx,
                    "n_ctx_train": max(n_ctx, 4096),
                    "n_embd": 64,
                    "n_params": 115520,
                    "size": 462080,
                    "ftype": "all F32",
                },
            }
        ],
    }


def timings(task: GenTask) -> dict[str, Any]:
    prompt_ms = task.prompt_ms
    predicted_ms = task.predicted_ms
    prompt_n = task.prompt_n
    predicted_n = task.n_generated
    return {
        "cache_n": task.cache_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1e3 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
    }


def usage(task: GenTask) -> dict[str, Any]:
    return {
        "completion_tokens": task.n_generated,
        "prompt_tokens": task.n_prompt,
        "total_tokens": task.n_prompt + task.n_generated,
        "prompt_tokens_details": {"cached_tokens": task.cache_n},
    }


def now_s() -> int:
    return int(time.time())


def chat_completion(
    task: GenTask, text: str, finish: str, model: str, cmpl_id: str
) -> dict[str, Any]:
    return {
        "choices": [
            {
                "finish_reason": finish,
                "index": 0,
                "message": {"role": "assistant", "content": text},
            }
        ],
        "created": now_s(),
        "model": model,
        "system_fingerprint": BUILD_INFO,
        "object": "chat.completion",
        "usage": usage(task),
        "id": cmpl_id,
        "timings": timings(task),
    }


def chat_chunk(
    delta: dict[str, Any], finish: str | None, model: str, cmpl_id: str
) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": now_s(),
        "id": cmpl_id,
        "model": model,
        "system_fingerprint": BUILD_INFO,
        "object": "chat.completion.chunk",
    }


def usage_chunk(task: GenTask, obj: str, model: str, cmpl_id: str) -> dict[str, Any]:
    return {
        "choices": [],
        "created": now_s(),
        "id": cmpl_id,
        "model": model,
        "system_fingerprint": BUILD_INFO,
        "object": obj,
        "usage": usage(task),
        "timings": timings(task),
    }


def text_completion(
    task: GenTask, text: str, finish: str | None, model: str, cmpl_id: str, final: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "created": now_s(),
        "model": model,
        "system_fingerprint": BUILD_INFO,
        "object": "text_completion",
    }
    if final:
        body["usage"] = usage(task)
    body["id"] = cmpl_id
    if final:
        body["timings"] = timings(task)
    return body


def native_completion(
    task: GenTask, text: str, stop_type: str, model: str, prompt: str, stream: bool
) -> dict[str, Any]:
    n_predict = len(task.reply)
    return {
        "index": 0,
        "content": text,
        "tokens": [],
        "id_slot": task.slot_id if task.slot_id is not None else -1,
        "stop": True,
        "model": model,
        "tokens_predicted": task.n_generated,
        "tokens_evaluated": task.n_prompt,
        "generation_settings": {
            **SAMPLING_PARAMS,
            "dry_sequence_breakers": ["\n", ":", '"', "*"],
            "stop": [],
            "max_tokens": n_predict,
            "n_predict": n_predict,
            "stream": stream,
            "logit_bias": [],
            "grammar": "",
            "grammar_lazy": False,
            "grammar_triggers": [],
            "preserved_tokens": [],
            "reasoning_format": "deepseek",
        },
        "prompt": prompt,
        "has_new_line": "\n" in text,
        "truncated": False,
        "stop_type": stop_type,
        "stopping_word": "",
        "tokens_cached": task.n_prompt + task.n_generated - 1,
        "timings": timings(task),
    }


def native_chunk(task: GenTask, piece: str, token: int) -> dict[str, Any]:
    return {
        "index": 0,
        "content": piece,
        "tokens": [token],
        "stop": False,
        "id_slot": -1,
        "tokens_predicted": task.n_generated,
        "tokens_evaluated": task.n_prompt,
    }


def anthropic_usage(task: GenTask) -> dict[str, Any]:
    return {
        "cache_read_input_tokens": task.cache_n,
        "input_tokens": task.n_prompt - task.cache_n,
        "output_tokens": task.n_generated,
    }


def anthropic_message(
    task: GenTask, text: str, stop_reason: str, model: str, msg_id: str
) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "model": model,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": anthropic_usage(task),
    }


def metrics_text(stats: EngineStats, processing: int, deferred: int) -> str:
    prompt_tps = (
        stats.prompt_tokens_total / stats.prompt_seconds_total
        if stats.prompt_seconds_total > 0
        else 0.0
    )
    predicted_tps = (
        stats.tokens_predicted_total / stats.tokens_predicted_seconds_total
        if stats.tokens_predicted_seconds_total > 0
        else 0.0
    )
    busy_per_decode = (
        stats.n_busy_slots_total / stats.n_decode_total if stats.n_decode_total else 0.0
    )
    rows: list[tuple[str, str, str, float | int]] = [
        (
            "prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed, excluding cached tokens",
            stats.prompt_tokens_total,
        ),
        (
            "prompt_tokens_cached_total",
            "counter",
            "Number of prompt tokens reused from the cache",
            stats.prompt_tokens_cached_total,
        ),
        (
            "prompt_seconds_total",
            "counter",
            "Total time spent processing prompts",
            round(stats.prompt_seconds_total, 6),
        ),
        (
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed",
            stats.tokens_predicted_total,
        ),
        (
            "tokens_predicted_seconds_total",
            "counter",
            "Total time spent generating tokens",
            round(stats.tokens_predicted_seconds_total, 6),
        ),
        (
            "n_decode_total",
            "counter",
            "Total number of llama_decode() calls, excluding speculative decoding and "
            "multimodal decoding",
            stats.n_decode_total,
        ),
        (
            "n_tokens_max",
            "counter",
            "Largest observed sequence length (prompt + generation)",
            stats.n_tokens_max,
        ),
        (
            "spec_decode_num_draft_tokens_total",
            "counter",
            "Speculative: Total draft tokens generated",
            0,
        ),
        (
            "spec_decode_num_accepted_tokens_total",
            "counter",
            "Speculative: Total draft tokens accepted by the target model",
            0,
        ),
        (
            "spec_decode_num_drafts_total",
            "counter",
            "Speculative: Total speculative decoding verification steps",
            0,
        ),
        (
            "prompt_tokens_seconds",
            "gauge",
            "Average prompt throughput in tokens/s",
            round(prompt_tps, 2),
        ),
        (
            "predicted_tokens_seconds",
            "gauge",
            "Average generation throughput in tokens/s",
            round(predicted_tps, 2),
        ),
        ("requests_processing", "gauge", "Number of requests processing", processing),
        ("requests_deferred", "gauge", "Number of requests deferred", deferred),
        (
            "n_busy_slots_per_decode",
            "gauge",
            "Average number of busy slots per llama_decode() call",
            round(busy_per_decode, 3),
        ),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in rows:
        lines.append(f"# HELP llamacpp:{name} {help_text}")
        lines.append(f"# TYPE llamacpp:{name} {kind}")
        lines.append(
            f"llamacpp:{name} {value:g}" if isinstance(value, float) else f"llamacpp:{name} {value}"
        )
    return "\n".join(lines) + "\n"
