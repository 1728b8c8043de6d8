"""Child processes of the benchmark: start, pin, wait for, account and always stop.

Every child runs in its own process group so that stopping it also stops whatever it forked
(nginx's worker, LiteLLM's uvicorn worker); an ``atexit`` hook stops any still running, so a
crashed harness leaves nothing behind. CPU time and memory are read from ``/proc`` for the whole
process tree, which is how a balancer's cost is isolated from the load generator's.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_LIVE: set[Child] = set()
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    # Bind-and-release has a small reuse race; children that lose it fail to start and the
    # caller reports it, which is better than a fixed port shared with other engineers' runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinned(command: Sequence[str], cpu_list: str | None) -> list[str]:
    """``command`` run under ``taskset -c cpu_list`` when taskset exists and a list is given."""
    taskset = shutil.which("taskset")
    if not cpu_list or taskset is None:
        return list(command)
    return [taskset, "-c", cpu_list, *command]


@dataclass(eq=False)
class Child:
    """One child process (group) with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])

    def stop(self, grace_s: float = 3.0) -> None:
        _LIVE.discard(self)
        if self.popen.poll() is not None:
            _reap_group(self.pid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        _reap_group(self.pid)


def _reap_group(pgid: int) -> None:
    # Grandchildren (nginx workers) may outlive their leader for a moment.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def spawn(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    return adopt(name, popen, log_path)


def adopt(name: str, popen: subprocess.Popen[bytes], log_path: Path) -> Child:
    """A child started elsewhere (``llamacpp_sim.spawn``), stopped like ours and at exit."""
    child = Child(name, popen, log_path)
    _LIVE.add(child)
    return child


def stop_all() -> None:
    for child in list(_LIVE):
        child.stop(grace_s=1.0)


atexit.register(stop_all)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(p) for p in text.split())
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid``'s process tree, in seconds."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{p}/stat").read_text()
            # Fields after the command name, which may contain spaces, start after ')'.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid``'s process tree."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used since boot (all cores, not idle)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def own_seconds() -> float:
    """CPU time of this process and every child it has reaped (all of them, once stopped)."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime
