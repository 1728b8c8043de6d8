#!/usr/bin/env python3
"""Write a tiny random-weight Llama GGUF that a real llama-server loads and serves.

The end-to-end suite needs a model, and nothing may be downloaded at run time, so one is made:
a byte-level BPE vocabulary (the 256 byte tokens, a handful of merges, two control tokens), a
chat template, and random F32 weights drawn from a fixed seed, so the file is the same on every
machine. The text it generates is noise; the HTTP shapes llama-server returns are real.

Two properties make the tests deterministic:
- the output projection is zero for every token but printable ASCII ones and large for those,
  so sampling never picks end-of-generation (a request runs to its ``max_tokens``) nor a byte
  that would make invalid UTF-8;
- ``--size large`` (about 40 MB of F16, 8 layers of n_embd 512) makes prompt processing take visible
  time, for tests that need a request to be in flight for a while.

The file is cached as ``~/.cache/llamacpp-ha/models/<size>-v<SCRIPT_VERSION>.gguf``; bump
``SCRIPT_VERSION`` whenever the output changes. The path is printed on the last line.

Needs the ``gguf`` and ``numpy`` packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPT_VERSION = 1
SEED = 20240611

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# Pairs merged in this order (byte-level, "Ġ" is the space byte). Each result is also a token.
MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "a"),
    ("Ġ", "s"),
    ("e", "n"),
    ("o", "u"),
    ("Ġ", "w"),
    ("i", "s"),
    ("Ġ", "c"),
    ("a", "t"),
)


@dataclass(frozen=True)
class ModelShape:
    f16: bool
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        f16=False, n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128, n_ctx_train=4096
    ),
    "large": ModelShape(
        f16=True, n_embd=512, n_layer=8, n_head=8, n_head_kv=8, n_ff=1024, n_ctx_train=4096
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-character table that byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamacpp-ha" / "models"


def default_path(size: str) -> Path:
    return cache_dir() / f"{size}-v{SCRIPT_VERSION}.gguf"


def write_model(path: Path, size: str) -> None:
    import gguf
    import numpy as np

    shape = SHAPES[size]
    rng = np.random.default_rng(SEED)
    byte_chars = bytes_to_unicode()

    tokens: list[str] = [byte_chars[b] for b in range(256)]
    types: list[int] = [gguf.TokenType.NORMAL] * 256
    emitted: list[bool] = [0x20 <= b <= 0x7E for b in range(256)]
    for left, right in MERGES:
        tokens.append(left + right)
        types.append(gguf.TokenType.NORMAL)
        emitted.append(True)
    bos_id = len(tokens)
    tokens += ["<|bos|>", "<|eos|>"]
    types += [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    emitted += [False, False]
    eos_id = bos_id + 1
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"llamacpp-ha {size} random llama v{SCRIPT_VERSION}")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if shape.f16 else gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in MERGES])
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    matrix_dtype = np.float16 if shape.f16 else np.float32

    def weight(rows: int, cols: int) -> np.ndarray:
        values: np.ndarray = rng.standard_normal((rows, cols)) / np.sqrt(cols)
        return values.astype(matrix_dtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    n_kv = shape.n_head_kv * head_dim
    writer.add_tensor("token_embd.weight", weight(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_kv, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_kv, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", ones(shape.n_embd))
    # Logits of roughly +-12 for printable tokens and exactly 0 for the rest: top-k and min-p
    # sampling then never reach end-of-generation, control tokens or non-ASCII bytes.
    output = rng.standard_normal((n_vocab, shape.n_embd)) * 1.5
    output[~np.array(emitted)] = 0.0
    writer.add_tensor("output.weight", output.astype(matrix_dtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ensure_model(size: str = "tiny", path: Path | None = None) -> Path:
    target = path or default_path(size)
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write_model(tmp, size)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--output", type=Path, help="write here instead of the cache")
    parser.add_argument("--force", action="store_true", help="rewrite even if cached")
    args = parser.parse_args(argv)
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        print(
            f"make-tiny-model: error: {exc.name} is missing; install it: "
            "pip install gguf==0.19.0 numpy (or pip install -e '.[test]')",
            file=sys.stderr,
        )
        return 1
    target = args.output or default_path(args.size)
    if args.force:
        target.unlink(missing_ok=True)
    print(ensure_model(args.size, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
