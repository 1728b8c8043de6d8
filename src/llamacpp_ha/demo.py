"""`llamacpp-ha demo`: three simulated llama-servers and the balancer in front of them.

The simulated backends run in a child process (as real llama-servers would run beside the
balancer), with different slot counts and one slower model profile, so queueing, affinity and
cache hits show on the monitor page. Ctrl-C stops the balancer as SIGTERM does (queued requests
get 503, streams in flight finish, up to --shutdown-grace seconds), and only then the backends.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llamacpp_sim import spawn

from .config import build_config
from .server import listen_error, serve

# Slots and speed per backend: two fast GPUs of different size and one slow CPU box.
NAMES = ("gpu-a", "gpu-b", "cpu-c")
SLOTS = (4, 2, 2)
PROFILES = ("gpu-8b", "gpu-8b", "cpu-1b")
PROG = "llamacpp-ha demo"


def run_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Three simulated llama-servers (gpu-a 4 slots, gpu-b 2, cpu-c 2 and slow) "
        "and the balancer in front of them. Ctrl-C stops the balancer first (queued requests "
        "get 503, streams in flight finish), then the simulators.",
        epilog="Load to watch on /monitor: .venv/bin/python examples/conversations.py --help",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the balancer listens on")
    parser.add_argument("--port", type=int, default=8000, help="port the balancer listens on")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds streams in flight may finish after Ctrl-C before they are cut",
    )
    args = parser.parse_args(list(argv))
    # Before the backends start and the banner is printed: a port in use is one line.
    problem = listen_error(args.host, args.port)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2

    # The backends lead a session of their own, so the terminal's Ctrl-C reaches only the
    # balancer: it drains while they still serve the streams in flight, and `with` stops them
    # once serve() has returned (or raised). Killed outright, the demo cannot stop them: they
    # notice that their parent is gone and stop themselves.
    with spawn(
        names=NAMES,
        slots=SLOTS,
        profile=PROFILES,
        new_session=True,
        exit_with_parent=True,
        timeout_s=30,
    ) as sim:
        backends = [{"url": b.url, "name": b.name} for b in sim.backends]
        config = build_config(
            {
                "host": args.host,
                "port": args.port,
                "backends": backends,
                "shutdown_grace_s": args.shutdown_grace,
            }
        )
        base = f"http://{args.host}:{args.port}"
        print(
            "\nllamacpp-ha demo: simulated backends gpu-a (4 slots), gpu-b (2), cpu-c (2, slow)\n"
            f"  OpenAI endpoint  {base}/v1\n"
            f"  monitor          {base}/monitor\n"
            f"  try              curl {base}/v1/chat/completions"
            " -H 'Content-Type: application/json'"
            ' -d \'{"messages":[{"role":"user","content":"Hello"}]}\'\n'
            f"  conversations    .venv/bin/python examples/conversations.py --base-url {base}/v1\n"
            "  Ctrl-C stops the balancer (streams in flight finish first), then the backends.\n",
            flush=True,
        )
        return serve(config)
