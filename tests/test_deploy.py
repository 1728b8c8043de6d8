"""The files under `deploy/` work as shipped: the systemd unit, its environment file, nginx.

systemd: `systemd-analyze verify` and `security --offline` read the unit with only its ExecStart
path replaced (verify needs the binary to exist), and copies broken on purpose must fail, so
these checks can fail; the balancer is started as the unit starts it (the environment file,
`--config`, `--workers`), reloaded by SIGHUP and stopped by SIGTERM within the unit's stop
timeout, and it serves under the unit's memory rule (MemoryDenyWriteExecute).

nginx: the real nginx, as this user, with a throwaway prefix, on a self-signed certificate,
includes `deploy/nginx-tls.conf` with only its documented placeholders replaced, in front of a
real balancer on simulated llama-servers: a stream arrives token by token (and the same file with
buffering on does not, so the check can fail), and a client that leaves mid-stream frees both the
balancer's slot and the backend's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from llamacpp_ha.config import ProxyConfig
from llamacpp_sim import Profile, SimConfig
from redis_server import redis_server
from serving import Served, balancer_for, free_port, sims
from sim_support import wait_until
from test_tls import self_signed

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "llamacpp-ha.service"
ENV_FILE = DEPLOY / "llamacpp-ha.env"
NGINX_SITE = DEPLOY / "nginx-tls.conf"
# The one path of the unit that names this machine: where the command is installed.
INSTALLED_COMMAND = "/opt/llamacpp-ha/bin/llamacpp-ha"
ENV_PLACEHOLDER = "REPLACE-WITH-THE-OUTPUT-OF-llamacpp-ha-hash-key"
DEFAULTS = ProxyConfig()
# A model that decodes 20 tokens a second (50 ms a token) and reads prompts at once: a stream
# long enough to see whether its tokens arrive spread out or all at the end.
PACED = Profile("paced", prompt_tps=100_000.0, decode_tps=20.0)
TOKEN_S = 1 / PACED.decode_tps


def command() -> str:
    """The `llamacpp-ha` console script of the environment running the tests."""
    path = Path(sys.executable).parent / "llamacpp-ha"
    if not path.is_file():
        raise AssertionError(f"{path} is missing: install the project (make venv)")
    return str(path)


def substitute(text: str, replacements: Mapping[str, str]) -> str:
    """`text` with each placeholder replaced; one that is missing is an error, so a file that
    drifts from what its header documents fails here instead of being tested half-replaced."""
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"placeholder {old!r} not found")
        text = text.replace(old, new)
    return text


def unit_settings(text: str) -> dict[str, list[str]]:
    """The [Service] section's settings, each with its values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def seconds(value: str) -> float:
    """A time span as systemd and nginx write the ones used here: 45s, 2min, 1800s, 1d."""
    match = re.fullmatch(r"(\d+)(s|min|m|h|d)?", value)
    assert match, f"unexpected time span {value!r}"
    scale = {None: 1, "s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return int(match[1]) * scale


def env_file_values(text: str) -> dict[str, str]:
    """The assignments of the environment file, each `NAME='value'`: single quotes with no
    quote or backslash inside are read alike by systemd's EnvironmentFile= and by sh."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = re.fullmatch(r"(LLAMACPP_HA_[A-Z_]+)='([^'\\]*)'", line)
        assert match, f"{ENV_FILE.name}:{number} is not NAME='value': {line!r}"
        values[match[1]] = match[2]
    return values


def nginx_settings(text: str) -> dict[str, list[tuple[str, list[str]]]]:
    """Each directive of an nginx file -> (the block it is in, its arguments), in order."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    blocks: list[str] = []
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for token in re.finditer(r"([^;{}]*)([;{}])", body):
        words, end = token[1].split(), token[2]
        if end == "{":
            blocks.append(" ".join(words))
        elif end == "}":
            blocks.pop()
        elif words:
            found.setdefault(words[0], []).append((" > ".join(blocks), words[1:]))
    return found


def only(settings: dict[str, list[tuple[str, list[str]]]], name: str) -> list[str]:
    assert len(settings.get(name, [])) == 1, f"{name}: expected once, got {settings.get(name)}"
    return settings[name][0][1]


# --- systemd ------------------------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        raise unittest.SkipTest("systemd-analyze is not installed: the unit cannot be verified")
    return path


class SystemdUnitTest(unittest.TestCase):
    def setUp(self) -> None:
        self.analyze = systemd_analyze()
        self.shipped = UNIT.read_text(encoding="utf-8")
        # ExecStart must name an existing executable for verify to pass: the real one here.
        self.rendered = substitute(self.shipped, {INSTALLED_COMMAND: command()})
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = Path(tmp.name)

    def analyze_unit(self, text: str, *args: str) -> subprocess.CompletedProcess[str]:
        # The file's name is the unit's name; a fresh directory per call keeps copies apart.
        directory = Path(tempfile.mkdtemp(dir=self.dir))
        path = directory / "llamacpp-ha.service"
        path.write_text(text, encoding="utf-8")
        return subprocess.run(
            [self.analyze, *args, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def verify(self, text: str) -> subprocess.CompletedProcess[str]:
        return self.analyze_unit(text, "verify", "--man=no")

    def test_the_unit_verifies_and_a_broken_one_does_not(self) -> None:
        result = self.verify(self.rendered)
        # verify only warns about an unknown or unparsable setting (and ignores it), with
        # status 0: any output at all is a mistake in the file.
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
        typo = substitute(self.rendered, {"NoNewPrivileges=yes": "NoNewPrivilege=yes"})
        self.assertIn("NoNewPrivilege", self.verify(typo).stderr)
        bad_value = substitute(self.rendered, {"Restart=on-failure": "Restart=sometimes"})
        self.assertIn("sometimes", self.verify(bad_value).stderr)
        missing = substitute(self.shipped, {INSTALLED_COMMAND: str(self.dir / "no-such-binary")})
        self.assertNotEqual(self.verify(missing).returncode, 0)

    def test_the_unit_is_hardened(self) -> None:
        # `security` scores exposure from 0 (locked down) to 10; --threshold is in tenths.
        result = self.analyze_unit(self.rendered, "security", "--offline=yes", "--threshold=20")
        self.assertEqual(result.returncode, 0, result.stdout[-2000:] + result.stderr)
        self.assertRegex(result.stdout, r"Overall exposure level for llamacpp-ha.service: 1\.")
        # The same unit without its hardening scores worse, so the threshold means something.
        bare = "\n".join(
            line
            for line in self.rendered.splitlines()
            if not re.match(r"(Protect|Private|Restrict|SystemCall|Capability|NoNew)", line)
        )
        self.assertNotEqual(
            self.analyze_unit(bare, "security", "--offline=yes", "--threshold=20").returncode, 0
        )

    def test_the_unit_agrees_with_the_balancer(self) -> None:
        unit = unit_settings(self.shipped)
        self.assertEqual(
            unit["ExecStart"], [f"{INSTALLED_COMMAND} --config /etc/llamacpp-ha/config.json"]
        )
        self.assertEqual(unit["EnvironmentFile"], ["-/etc/llamacpp-ha/env"])
        self.assertEqual(unit["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(unit["Restart"], ["on-failure"])
        # What test_serves_where_writable_executable_memory_is_refused runs the balancer under.
        self.assertEqual(unit["MemoryDenyWriteExecute"], ["yes"])
        self.assertEqual(unit["NoNewPrivileges"], ["yes"])
        # The stop timeout outlasts the drain (shutdown_grace_s) and uvicorn's 5 s after it.
        self.assertEqual(unit["KillSignal"], ["SIGTERM"])
        self.assertEqual(unit["KillMode"], ["mixed"])
        self.assertGreater(seconds(unit["TimeoutStopSec"][0]), DEFAULTS.shutdown_grace_s + 5)
        # Room for max_connections clients and the 256 descriptors kept for the rest.
        self.assertGreaterEqual(int(unit["LimitNOFILE"][0]), DEFAULTS.max_connections + 256)
        # What the unit does not restart on is what the command exits with on a bad config.
        with tempfile.NamedTemporaryFile("w", suffix=".json") as bad:
            bad.write('{"port": "not a port", "backends": ["http://127.0.0.1:1"]}')
            bad.flush()
            status = subprocess.run(
                [command(), "--config", bad.name], capture_output=True, timeout=60, check=False
            ).returncode
        self.assertEqual(unit["RestartPreventExitStatus"], [str(status)])
        self.assertEqual(status, 2)
        # A reload that comes before the balancer handles SIGHUP ends it by that signal.
        self.assertEqual(unit["RestartForceExitStatus"], ["SIGHUP"])

    def test_the_env_files_placeholder_stops_the_start(self) -> None:
        # Shipped as is, the env file must not let the balancer run with a key nobody chose.
        env = service_environment(ENV_FILE.read_text(encoding="utf-8"), {})
        result = subprocess.run(
            [command(), "--backend", "http://127.0.0.1:1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("admin_keys", result.stderr)


def service_environment(env_text: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment systemd gives the balancer: the env file's variables and `extra`, over
    this one without any LLAMACPP_HA_* of its own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACPP_HA_")}
    return {**base, **env_file_values(env_text), **extra}


async def get_json(url: str) -> object:
    # A new connection each time: with --workers, the kernel picks the worker per connection.
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(url)).json()


class ServiceProcessTest(unittest.IsolatedAsyncioTestCase):
    """The balancer as the unit runs it, signals and all (no systemd needed)."""

    async def test_env_file_keys_reload_on_sighup_with_workers_and_stop_on_sigterm(
        self,
    ) -> None:
        key = "sk-deploy-test-admin"
        digest = hashlib.sha256(key.encode()).hexdigest()
        env_text = substitute(ENV_FILE.read_text(encoding="utf-8"), {ENV_PLACEHOLDER: digest})
        stop_timeout_s = seconds(
            unit_settings(UNIT.read_text(encoding="utf-8"))["TimeoutStopSec"][0]
        )
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "config.json"
            port = free_port()
            async with (
                redis_server() as redis,
                sims(SimConfig(slots=1), SimConfig(slots=1)) as (
                    a,
                    b,
                ),
            ):
                config = {"port": port, "backends": [a.url], "poll_interval_s": 0.1}
                config_path.write_text(json.dumps(config))
                # --workers as the environment's LLAMACPP_HA_WORKERS, the Redis they share as
                # an operator would add it to the env file.
                env = service_environment(
                    env_text, {"LLAMACPP_HA_STATE_URL": redis.url, "LLAMACPP_HA_WORKERS": "2"}
                )
                parent = await asyncio.create_subprocess_exec(
                    command(),
                    "--config",
                    str(config_path),
                    "--log-level",
                    "warning",
                    env=env,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                base = f"http://127.0.0.1:{port}"
                try:
                    await self.until_every_worker_has(base, backends=1)
                    # The admin key came from the env file.
                    async with httpx.AsyncClient(timeout=5) as client:
                        admin = await client.get(
                            base + "/admin/backends", headers={"Authorization": f"Bearer {key}"}
                        )
                        self.assertEqual(admin.status_code, 200)
                        anonymous = await client.get(base + "/admin/backends")
                        self.assertEqual(anonymous.status_code, 401)
                    config_path.write_text(json.dumps({**config, "backends": [a.url, b.url]}))
                    parent.send_signal(signal.SIGHUP)  # what ExecReload sends
                    await self.until_every_worker_has(base, backends=2)
                    self.assertIsNone(parent.returncode)
                    started = time.monotonic()
                    parent.send_signal(signal.SIGTERM)  # KillSignal, to the main process
                    self.assertEqual(await asyncio.wait_for(parent.wait(), stop_timeout_s), 0)
                    self.assertLess(time.monotonic() - started, stop_timeout_s)
                finally:
                    if parent.returncode is None:
                        parent.kill()
                        await parent.wait()

    async def until_every_worker_has(self, base: str, backends: int) -> None:
        seen: set[str] = set()
        async with asyncio.timeout(30):
            while len(seen) < 2:
                try:
                    data = await get_json(base + "/monitor/data")
                except httpx.TransportError:  # not listening yet
                    await asyncio.sleep(0.05)
                    continue
                assert isinstance(data, dict)
                if len(data["backends"]) == backends:
                    seen.add(data["replicas"]["replica"])
                else:
                    await asyncio.sleep(0.05)

    async def test_serves_where_writable_executable_memory_is_refused(self) -> None:
        # MemoryDenyWriteExecute=yes, as the kernel's own rule (PR_SET_MDWE, Linux 6.3+), with
        # no_new_privs (NoNewPrivileges=yes); both hold across exec, as under systemd.
        wrapper = (
            "import ctypes, os, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(65, 1, 0, 0, 0) != 0:\n"
            "    sys.exit(f'prctl: {os.strerror(ctypes.get_errno())}')\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n"
        )
        probe = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", wrapper, "/bin/true"],
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            raise unittest.SkipTest(f"no PR_SET_MDWE here (Linux 6.3+): {probe.stderr!r}")
        async with sims(SimConfig(slots=1)) as (sim,):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                wrapper,
                command(),
                "--backend",
                sim.url,
                "--port",
                str(port),
                "--poll-interval",
                "0.1",
                "--log-level",
                "warning",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                base = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient(timeout=5) as client:
                    async with asyncio.timeout(30):
                        while True:
                            try:
                                if (await client.get(base + "/health")).status_code == 200:
                                    break
                            except httpx.TransportError:
                                pass
                            await asyncio.sleep(0.05)
                    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
                    answer = await client.post(base + "/v1/chat/completions", json=body)
                self.assertEqual(answer.status_code, 200)
                self.assertTrue(answer.text.rstrip().endswith("data: [DONE]"))
                self.assertEqual(sim.processing, 0)
            finally:
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(await asyncio.wait_for(proc.wait(), 30), 0)


# --- nginx --------------------------------------------------------------------------------


def nginx_binary() -> str:
    for candidate in ("/usr/sbin/nginx", shutil.which("nginx")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("nginx is not installed: run scripts/install-test-deps.sh")


@dataclass
class Nginx:
    https_url: str
    http_url: str
    trust: ssl.SSLContext
    workdir: Path


def render_site(text: str, *, https_port: int, http_port: int, upstream: str, workdir: Path) -> str:
    """The shipped site with only what its header says to adapt: listen ports, certificate,
    upstream. server_name stays: the only server on its port answers whatever the Host."""
    cert, key = self_signed(workdir)
    return substitute(
        text,
        {
            "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "/etc/letsencrypt/live/llm.example.com/fullchain.pem": str(cert),
            "/etc/letsencrypt/live/llm.example.com/privkey.pem": str(key),
            "server 127.0.0.1:8000;": f"server {upstream};",
        },
    )


MAIN_CONF = """
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    gzip on;
    gzip_types text/event-stream application/json;
    include {workdir}/conf.d/llamacpp-ha.conf;
}}
"""


def prepare_nginx(workdir: Path, site: str, https_port: int, http_port: int, upstream: str) -> None:
    """Certificate, site and main file in `workdir`, checked by `nginx -t`.

    The main file is the one an operator's nginx already has, reduced to what runs without root
    and outside /etc, with gzip on for event streams as a careless http block might have it:
    the site must turn it off, or compression would hold tokens back."""
    # As root, nginx's workers run as nobody, which must reach the temp paths in here.
    workdir.chmod(0o755)
    text = render_site(
        site, https_port=https_port, http_port=http_port, upstream=upstream, workdir=workdir
    )
    (workdir / "conf.d").mkdir()
    (workdir / "conf.d" / "llamacpp-ha.conf").write_text(text, encoding="utf-8")
    (workdir / "nginx.conf").write_text(MAIN_CONF.format(workdir=workdir), encoding="utf-8")
    checked = subprocess.run(
        [nginx_binary(), *nginx_args(workdir), "-t"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if checked.returncode != 0:
        raise AssertionError(f"nginx -t refused the configuration:\n{checked.stderr}")


def nginx_args(workdir: Path) -> list[str]:
    return ["-p", str(workdir), "-c", str(workdir / "nginx.conf")]


@asynccontextmanager
async def nginx_in_front(served: Served, site: str | None = None) -> AsyncIterator[Nginx]:
    """A real nginx, its prefix, pid and logs in a temporary directory, including the shipped
    site (or `site`, a variant of it) on two free ports, in front of `served`."""
    binary = nginx_binary()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        https_port, http_port = free_port(), free_port()
        await asyncio.to_thread(
            prepare_nginx,
            workdir,
            site if site is not None else NGINX_SITE.read_text(encoding="utf-8"),
            https_port,
            http_port,
            served.url.removeprefix("http://"),
        )
        # Early messages (before error_log is read) go to stderr; daemon off: our child.
        proc = await asyncio.create_subprocess_exec(
            binary,
            *nginx_args(workdir),
            "-g",
            "daemon off;",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(15):
                for port in (https_port, http_port):
                    while not await _listening(port):
                        if proc.returncode is not None:
                            assert proc.stderr is not None
                            early = (await proc.stderr.read()).decode(errors="replace")
                            raise AssertionError(f"nginx exited: {early}{_log(workdir)}")
                        await asyncio.sleep(0.02)
            trust = ssl.create_default_context(cafile=str(workdir / "cert.pem"))
            yield Nginx(
                f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", trust, workdir
            )
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.communicate(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def _log(workdir: Path) -> str:
    path = workdir / "error.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def curl_with_http2() -> str:
    curl = shutil.which("curl")
    features = b"" if curl is None else subprocess.run([curl, "-V"], capture_output=True).stdout
    if curl is None or b"HTTP2" not in features:
        raise unittest.SkipTest("no curl with HTTP/2 support here")
    return curl


@dataclass
class Arrivals:
    """When each content token of a stream reached the client."""

    token_times: list[float]
    done: bool
    headers: httpx.Headers

    @property
    def span_s(self) -> float:
        return self.token_times[-1] - self.token_times[0]

    @property
    def moments(self) -> int:
        """Separate arrivals: a token more than a fifth of a token's time after the one before
        starts a new one (tokens read at once are parsed within microseconds)."""
        gaps = zip(self.token_times, self.token_times[1:], strict=False)
        return 1 + sum(later - earlier > TOKEN_S / 5 for earlier, later in gaps)


def chat(max_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": max_tokens,
        "stream": True,
        **extra,
    }


async def stream_through(front: Nginx, max_tokens: int) -> Arrivals:
    times: list[float] = []
    done = False
    pending = b""
    async with (
        httpx.AsyncClient(verify=front.trust, timeout=30) as client,
        client.stream("POST", front.https_url + "/v1/chat/completions", json=chat(max_tokens)) as r,
    ):
        assert r.status_code == 200, r.status_code
        # Raw reads: what the socket delivered, as it delivered it (no decoding of our own).
        async for chunk in r.aiter_raw():
            now = time.monotonic()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            tokens = 0
            for line in lines:
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        tokens += 1
            times.extend([now] * tokens)
        return Arrivals(times, done, r.headers)


class NginxTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        nginx_binary()  # fails at once, naming the script that installs it

    def test_the_site_agrees_with_the_balancer(self) -> None:
        site = nginx_settings(NGINX_SITE.read_text(encoding="utf-8"))
        location = "server > location /"
        for name in ("proxy_buffering", "proxy_request_buffering", "gzip", "proxy_cache"):
            self.assertIn((location, ["off"]), site[name], name)
        self.assertEqual(only(site, "proxy_ignore_client_abort"), ["off"])
        self.assertEqual(only(site, "proxy_http_version"), ["1.1"])
        self.assertEqual(only(site, "client_max_body_size"), ["32m"])
        self.assertEqual(32 * 1024 * 1024, DEFAULTS.max_body_size)
        # nginx must not cut a request the balancer is still serving, whatever its phase.
        read_s = seconds(only(site, "proxy_read_timeout")[0])
        self.assertGreaterEqual(read_s, DEFAULTS.request_timeout_s)
        self.assertGreaterEqual(read_s, DEFAULTS.queue_timeout_s + DEFAULTS.first_byte_timeout_s)
        self.assertGreater(read_s, DEFAULTS.idle_timeout_s)
        # nginx closes idle upstream connections before the balancer does (no 502 race).
        ((block, value),) = site["keepalive_timeout"]
        self.assertEqual(block, "upstream llamacpp_ha")
        self.assertLess(seconds(value[0]), DEFAULTS.keepalive_timeout_s)
        headers = {args[0]: args[1] for _, args in site["proxy_set_header"]}
        self.assertEqual(headers["X-Forwarded-For"], "$remote_addr")
        self.assertEqual(headers["X-Forwarded-Proto"], "$scheme")
        self.assertEqual(headers["Connection"], '""')

    async def test_a_stream_arrives_token_by_token(self) -> None:
        tokens = 24
        generation_s = (tokens - 1) * TOKEN_S
        async with (
            sims(SimConfig(slots=1, profile=PACED)) as (sim,),
            balancer_for([sim], trusted_proxies=["127.0.0.1"]) as lb,
        ):
            async with nginx_in_front(lb) as front:
                arrivals = await stream_through(front, tokens)
            self.assertTrue(arrivals.done)
            self.assertEqual(len(arrivals.token_times), tokens)
            self.assertNotIn("content-encoding", arrivals.headers)
            # Spread over the generation, in many separate arrivals: passed on as they came.
            # A busy machine only spreads them more.
            self.assertGreater(arrivals.span_s, generation_s / 2)
            self.assertGreaterEqual(arrivals.moments, tokens // 3)

            # The control: the same file with nginx's default buffering holds the tokens back,
            # so the checks above can fail.
            # The balancer also sends `X-Accel-Buffering: no` on streams, which would turn
            # buffering off again: that header is ignored too.
            buffered = substitute(
                NGINX_SITE.read_text(encoding="utf-8"),
                {
                    "proxy_buffering off;": (
                        "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"
                    )
                },
            )
            async with nginx_in_front(lb, buffered) as front:
                held = await stream_through(front, tokens)
            self.assertTrue(held.done)
            self.assertLess(held.span_s, generation_s / 4)
            self.assertLess(held.moments, tokens // 3)

    async def test_a_stream_arrives_token_by_token_over_http2(self) -> None:
        # httpx speaks HTTP/1.1 here (no h2 package); curl with nghttp2 speaks HTTP/2, which
        # browsers and many clients pick on `listen ... http2`.
        curl = curl_with_http2()
        tokens = 24
        async with (
            sims(SimConfig(slots=1, profile=PACED)) as (sim,),
            balancer_for([sim]) as lb,
            nginx_in_front(lb) as front,
        ):
            proc = await asyncio.create_subprocess_exec(
                curl,
                "--http2",
                "--no-buffer",
                "--silent",
                "--cacert",
                str(front.workdir / "cert.pem"),
                "--header",
                "Content-Type: application/json",
                "--data",
                json.dumps(chat(tokens)),
                "--write-out",
                "\nhttp_version=%{http_version}\n",
                front.https_url + "/v1/chat/completions",
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            times: list[float] = []
            lines: list[bytes] = []
            async with asyncio.timeout(30):
                async for line in proc.stdout:
                    lines.append(line.strip())
                    if b'"content":"' in line:
                        times.append(time.monotonic())
                self.assertEqual(await proc.wait(), 0)
            self.assertIn(b"http_version=2", lines)
            self.assertIn(b"data: [DONE]", lines)
            self.assertEqual(len(times), tokens)
            self.assertGreater(times[-1] - times[0], (tokens - 1) * TOKEN_S / 2)

    async def test_a_client_that_leaves_mid_stream_frees_the_slot(self) -> None:
        tokens = 400  # 20 s of generation: it must end long before that
        async with (
            sims(SimConfig(slots=1, profile=PACED)) as (sim,),
            balancer_for([sim], trusted_proxies=["127.0.0.1"]) as lb,
            nginx_in_front(lb) as front,
            httpx.AsyncClient(verify=front.trust, timeout=30) as client,
        ):
            url = front.https_url + "/v1/chat/completions"
            async with client.stream("POST", url, json=chat(tokens)) as response:
                self.assertEqual(response.status_code, 200)
                left_at = 0.0
                async for line in response.aiter_lines():
                    if '"content":"' in line:
                        left_at = time.monotonic()
                        break  # and leave: the connection to nginx closes here
            backends = lb.balancer.registry.backends
            await wait_until(
                lambda: (
                    lb.balancer.stats.in_flight == 0
                    and all(b.slots.in_flight == 0 for b in backends)
                    and sim.processing == 0
                ),
                within_s=10,
            )
            freed_s = time.monotonic() - left_at
            self.assertLess(freed_s, tokens * TOKEN_S / 2)
            (record,) = [r for r in sim.requests if r.path == "/v1/chat/completions"]
            self.assertEqual(record.outcome, "client_closed")
            metrics = (await client.get(front.https_url + "/metrics")).text
            self.assertRegex(metrics, r"(?m)^llamacpp_ha_client_disconnects_total 1\.0$")
            # The one slot serves the next client at once.
            again = await client.post(url, json=chat(3))
            self.assertEqual(again.status_code, 200)
            self.assertTrue(again.text.rstrip().endswith("data: [DONE]"))

    async def test_a_client_that_leaves_while_queued_gives_its_place_back(self) -> None:
        # While a request waits in the balancer's queue no byte flows through nginx: only
        # nginx noticing the client's close (proxy_ignore_client_abort off) can tell.
        ignoring = substitute(
            NGINX_SITE.read_text(encoding="utf-8"),
            {"proxy_ignore_client_abort off;": "proxy_ignore_client_abort on;"},
        )
        for site, leaves in ((None, True), (ignoring, False)):
            with self.subTest(shipped=site is None):
                async with (
                    sims(SimConfig(slots=1, profile=PACED)) as (sim,),
                    balancer_for([sim]) as lb,
                    nginx_in_front(lb, site) as front,
                    httpx.AsyncClient(verify=front.trust, timeout=30) as client,
                ):
                    url = front.https_url + "/v1/chat/completions"
                    first = asyncio.create_task(client.post(url, json=chat(40)))
                    await wait_until(lambda: sim.processing == 1)
                    queued = asyncio.create_task(client.post(url, json=chat(3)))
                    await wait_until(lambda: len(lb.balancer.queue) == 1)
                    queued.cancel()  # the client gives up and closes its connection
                    if leaves:
                        await wait_until(
                            lambda: len(lb.balancer.queue) == 0 and lb.balancer.stats.in_flight == 1
                        )
                    self.assertEqual((await first).status_code, 200)
                    generations = [r for r in sim.requests if r.path == "/v1/chat/completions"]
                    if leaves:
                        self.assertEqual(len(generations), 1)
                    else:
                        # Held by nginx: the slot went to a client long gone.
                        await wait_until(
                            lambda: (
                                len([r for r in sim.requests if r.path == "/v1/chat/completions"])
                                == 2
                            )
                        )

    async def test_tls_redirect_and_client_address(self) -> None:
        async with (
            sims(SimConfig(slots=1)) as (sim,),
            balancer_for([sim], trusted_proxies=["127.0.0.1"]) as lb,
            nginx_in_front(lb) as front,
        ):
            async with httpx.AsyncClient(timeout=10) as plain:
                redirect = await plain.get(front.http_url + "/v1/models")
            self.assertEqual(redirect.status_code, 301)
            self.assertEqual(redirect.headers["location"], "https://llm.example.com/v1/models")
            async with httpx.AsyncClient(verify=front.trust, timeout=10) as client:
                answer = await client.post(
                    front.https_url + "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    headers={"X-Forwarded-For": "203.0.113.7"},  # forged by the client
                )
            self.assertEqual(answer.status_code, 200)
            self.assertIn("max-age=", answer.headers["strict-transport-security"])
            (record,) = [r for r in sim.requests if r.path == "/v1/chat/completions"]
            # nginx passed the client's address, the balancer believed it (trusted_proxies)
            # and added nginx's: the forged one went nowhere.
            self.assertEqual(record.headers["X-Forwarded-For"], "127.0.0.1, 127.0.0.1")


if __name__ == "__main__":
    unittest.main()
