"""The `llamacpp-ha` command: serve (the default), `demo`, and `check-config FILE`."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import ConfigError, ProxyConfig, build_config, without_credentials
from .policies import DEFAULT_POLICY, POLICIES

# flag -> (config field, help). Values stay strings here so that pydantic checks them and
# names the field in the error, exactly as for the file and the environment.
_FLAGS: dict[str, tuple[str, str]] = {
    "--host": ("host", "address to listen on (default 127.0.0.1)"),
    "--port": ("port", "port to listen on (default 8000)"),
    "--routing": ("routing", "{policies}"),
    "--poll-interval": ("poll_interval_s", "seconds between polls of each backend (default 1)"),
    "--queue-timeout": ("queue_timeout_s", "seconds a request may wait for a slot (default 60)"),
    "--max-queue": ("max_queue", "requests that may wait before 503 queue_full (default 1024)"),
    "--session-ttl": ("session_ttl_s", "seconds a conversation stays tied to a backend (900)"),
    "--max-sessions": ("max_sessions", "prompt prefixes remembered at most (default 100000)"),
    "--max-cache-wait": (
        "max_cache_wait_s",
        "seconds a request may wait for a busy backend that holds its prompt (default 0.5)",
    ),
    "--reorder-window": (
        "reorder_window_s",
        "a freed slot may go to a request that arrived up to this many seconds after the "
        "first in line (default 1)",
    ),
    "--reorder-max": ("reorder_max", "times the first in line may be passed over (default 4)"),
    "--pin-slots": (
        "pin_slots",
        "true: send id_slot where it is safe and reuses as much as llama-server's choice "
        "(default false)",
    ),
    "--connect-timeout": ("connect_timeout_s", "seconds to connect to a backend (default 5)"),
    "--first-byte-timeout": (
        "first_byte_timeout_s",
        "seconds to wait for a backend's response headers (default 600)",
    ),
    "--idle-timeout": (
        "idle_timeout_s",
        "seconds between data events before 504; SSE comments do not count (default 120)",
    ),
    "--request-timeout": (
        "request_timeout_s",
        "overall deadline per request, queue wait and every attempt included (default 1800)",
    ),
    "--write-timeout": (
        "write_timeout_s",
        "seconds a client may take to accept a chunk before it is cut (default 30)",
    ),
    "--receive-timeout": (
        "receive_timeout_s",
        "seconds a client may take to send its request body before 408 (default 30)",
    ),
    "--header-timeout": (
        "header_timeout_s",
        "seconds a client may take to send its request headers before 408 (default 10)",
    ),
    "--keepalive-timeout": (
        "keepalive_timeout_s",
        "seconds an idle client connection stays open (default 5)",
    ),
    "--shutdown-grace": (
        "shutdown_grace_s",
        "seconds streams in flight may finish after SIGTERM or SIGINT (default 30)",
    ),
    "--max-attempts": ("max_attempts", "backends tried per request before giving up (default 3)"),
    "--max-body-size": ("max_body_size", "largest request body in bytes (default 32 MiB)"),
    "--log-level": ("log_level", "debug, info (default), warning or error"),
    "--log-format": ("log_format", "text (default) or json: one JSON object per line"),
    "--max-tokens-cap": ("max_tokens_cap", "reject requests asking for more tokens (400)"),
    "--max-header-size": ("max_header_size", "largest request head in bytes (default 32768)"),
    "--state-url": (
        "state_url",
        "redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... or unix:///PATH: share slots, "
        "routing, limits and operations with the other replicas using it (default: none)",
    ),
    "--lease-ttl": (
        "lease_ttl_s",
        "seconds a dead replica's slots stay held in shared state (default 10)",
    ),
    "--replica-id": ("replica_id", "this replica's name in shared state (default HOST-PID)"),
    "--workers": (
        "workers",
        "worker processes on this machine, sharing the port and the state (default 1; "
        "more needs --state-url)",
    ),
    "--max-connections": (
        "max_connections",
        "client connections open at once; one more gets 503 (default 4096)",
    ),
}


def _version() -> str:
    try:
        return importlib.metadata.version("llamacpp-ha")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _serve_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llamacpp-ha",
        description="Slot-aware load balancer for llama.cpp llama-server.",
        epilog="Subcommands: 'llamacpp-ha demo' runs simulated backends behind the balancer; "
        "'llamacpp-ha check-config FILE' validates a configuration file (secrets shown as hash "
        "prefixes); 'llamacpp-ha hash-key' prints a key's SHA-256 for the configuration.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--config", type=Path, help="JSON configuration file")
    parser.add_argument(
        "--backend",
        dest="backends",
        action="append",
        metavar="URL",
        help="a llama-server base URL (repeatable)",
    )
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help="a key clients must send as 'Authorization: Bearer KEY' (repeatable)",
    )
    policies = "; ".join(
        f"{name}{' (default)' if name == DEFAULT_POLICY else ''}: {spec.summary}"
        for name, spec in POLICIES.items()
    )
    for flag, (field, help_text) in _FLAGS.items():
        parser.add_argument(
            flag,
            dest=field,
            metavar=field.rsplit("_s", 1)[0].upper(),
            help=help_text.format(policies=policies),
        )
    return parser


def load_config(argv: Sequence[str]) -> ProxyConfig:
    """Parse CLI flags over the environment over the file; raise ConfigError when invalid."""
    args: dict[str, Any] = vars(_serve_parser().parse_args(list(argv)))
    config_file = args.pop("config", None)
    return build_config(args, config_file)


def check_config(argv: Sequence[str]) -> int:
    parser = _Parser(prog="llamacpp-ha check-config", description="Validate a config file.")
    parser.add_argument("file", type=Path)
    args = parser.parse_args(list(argv))
    config = build_config(config_file=args.file)
    print(json.dumps(shown_config(config), indent=2))
    return 0


def shown_config(config: ProxyConfig) -> dict[str, Any]:
    """What `check-config` prints: every setting, every secret as the prefix of its SHA-256
    (enough to tell two apart, nothing to log in with), never in clear."""
    data: dict[str, Any] = config.model_dump(mode="json")
    for field in ("api_keys", "admin_keys"):
        data[field] = [
            {**{k: v for k, v in key.items() if k != "sha256"}, "sha256": _prefix(key["sha256"])}
            for key in data[field]
        ]
    for backend in data["backends"]:
        if backend.get("api_key"):
            digest = hashlib.sha256(backend["api_key"].encode()).hexdigest()
            backend["api_key"] = f"sha256:{_prefix(digest)}"
    if config.state_url:
        data["state_url"] = without_credentials(config.state_url)
    return data


def _prefix(digest: str) -> str:
    return digest[:12] + "…"


def hash_key(argv: Sequence[str]) -> int:
    parser = _Parser(
        prog="llamacpp-ha hash-key",
        description="Print a client or admin key and its SHA-256, for the configuration: the "
        "key read from standard input, or a new random one when nothing is piped in.",
    )
    parser.parse_args(list(argv))
    given = "" if sys.stdin.isatty() else sys.stdin.read().strip()
    key = given or "sk-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    if not given:
        print(f"key (shown once; give it to the client): {key}")
    print(f"sha256: {digest}")
    print(f'config: {{"id": "my-client", "sha256": "{digest}"}}')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["check-config"]:
            return check_config(argv[1:])
        if argv[:1] == ["hash-key"]:
            return hash_key(argv[1:])
        if argv[:1] == ["demo"]:
            from .demo import run_demo

            return run_demo(argv[1:])
        # A reload asked for before the server can reload (systemd's ExecReload right after
        # a start) is moot, the file is being read now: ignored, rather than death by SIGHUP.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        config = load_config(argv)
        # The app and uvicorn are imported only once there is something to serve.
        from .server import listen_error, serve

        # Before anything is printed, and before --workers forks (each worker then binds the
        # port with SO_REUSEPORT, which the check does not hold).
        problem = listen_error(config.host, config.port)
        if problem is not None:
            print(f"llamacpp-ha: {problem}", file=sys.stderr)
            return 2
        return serve(config, source=lambda: load_config(argv))
    except ConfigError as exc:
        print(f"llamacpp-ha: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
