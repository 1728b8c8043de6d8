from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

from llamacpp_ha.__main__ import load_config, main
from llamacpp_ha.config import BackendConfig, ConfigError, build_config


class ConfigFileTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACPP_HA_")}
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)

    def write(self, data: object) -> Path:
        path = Path(self.dir.name) / "config.json"
        path.write_text(json.dumps(data))
        return path

    def test_file_as_documented(self) -> None:
        path = self.write(
            {
                "port": 8001,
                "api_keys": ["k1"],
                "backends": [{"url": "http://gpu-a:8080", "name": "gpu-a", "api_key": "b"}],
                "queue_timeout_s": 60,
            }
        )
        config = build_config(config_file=path)
        self.assertEqual(config.port, 8001)
        self.assertEqual(
            [k.id for k in config.api_keys], [f"key-{hashlib.sha256(b'k1').hexdigest()[:8]}"]
        )
        self.assertEqual(
            config.backends, [BackendConfig(url="http://gpu-a:8080", name="gpu-a", api_key="b")]
        )
        self.assertEqual(config.queue_timeout_s, 60)

    def test_env_overrides_file(self) -> None:
        path = self.write({"port": 8001, "backends": ["http://a:1"]})
        with mock.patch.dict(os.environ, {"LLAMACPP_HA_PORT": "8002"}):
            self.assertEqual(build_config(config_file=path).port, 8002)

    def test_cli_overrides_env_and_file(self) -> None:
        path = self.write({"port": 8001, "backends": ["http://a:1"]})
        with mock.patch.dict(os.environ, {"LLAMACPP_HA_PORT": "8002"}):
            config = load_config(["--config", str(path), "--port", "8003"])
        self.assertEqual(config.port, 8003)

    def test_cli_backends_replace_file_backends(self) -> None:
        path = self.write({"backends": ["http://a:1"]})
        config = load_config(
            ["--config", str(path), "--backend", "http://b:2", "--backend", "http://c:3"]
        )
        self.assertEqual([b.url for b in config.backends], ["http://b:2", "http://c:3"])

    def test_env_backends_as_json(self) -> None:
        with mock.patch.dict(
            os.environ,
            {"LLAMACPP_HA_BACKENDS": '["http://a:1", {"url": "http://b:2", "name": "b"}]'},
        ):
            config = build_config()
        self.assertEqual([b.name for b in config.backends], ["a:1", "b"])

    def test_every_flag_reaches_its_field(self) -> None:
        config = load_config(
            [
                "--backend", "http://a:1", "--host", "0.0.0.0", "--port", "9", "--api-key", "k",
                "--routing", "round-robin", "--poll-interval", "0.5", "--queue-timeout", "7",
                "--max-queue", "3", "--session-ttl", "11", "--max-sessions", "12",
                "--connect-timeout", "2", "--first-byte-timeout", "30", "--idle-timeout", "4",
                "--max-body-size", "1000", "--log-level", "debug",
            ]
        )  # fmt: skip
        self.assertEqual(
            (config.host, config.port, config.routing, config.poll_interval_s),
            ("0.0.0.0", 9, "round-robin", 0.5),
        )
        self.assertEqual(
            [key.sha256 for key in config.api_keys], [hashlib.sha256(b"k").hexdigest()]
        )
        self.assertEqual(
            (config.queue_timeout_s, config.max_queue, config.session_ttl_s, config.max_sessions),
            (7, 3, 11, 12),
        )
        self.assertEqual(
            (config.connect_timeout_s, config.first_byte_timeout_s, config.idle_timeout_s),
            (2, 30, 4),
        )
        self.assertEqual((config.max_body_size, config.log_level), (1000, "debug"))

    def test_backend_name_defaults_to_host_port(self) -> None:
        self.assertEqual(BackendConfig(url="http://gpu-a:8080/").name, "gpu-a:8080")

    def test_trailing_slash_is_dropped(self) -> None:
        self.assertEqual(BackendConfig(url="http://gpu-a:8080/").url, "http://gpu-a:8080")

    def test_api_key_not_in_repr(self) -> None:
        self.assertNotIn("sekrit", repr(BackendConfig(url="http://a:1", api_key="sekrit")))
        self.assertNotIn(
            "sekrit", repr(build_config({"backends": ["http://a:1"], "api_keys": ["sekrit"]}))
        )


class InvalidConfigTest(unittest.TestCase):
    def assertInvalid(self, overrides: dict[str, object], field: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            build_config(overrides)
        message = str(caught.exception)
        self.assertIn(field, message)
        self.assertNotIn("\n", message)

    def test_bad_scheme(self) -> None:
        self.assertInvalid({"backends": ["ftp://a:1"]}, "backends.0.url")

    def test_bad_state_url(self) -> None:
        for url in ("http://redis:6379", "redis://", "redis://h:99999", "redis://h/x", "unix://"):
            with self.subTest(url=url):
                self.assertInvalid({"backends": ["http://a:1"], "state_url": url}, "state_url")

    def test_good_state_urls(self) -> None:
        for url in (
            "redis://10.0.0.5:6379/0",
            "redis://:secret@redis.internal/2",
            "rediss://user:secret@redis.internal:6380",
            "unix:///run/redis/redis.sock",
        ):
            with self.subTest(url=url):
                config = build_config({"backends": ["http://a:1"], "state_url": url})
                self.assertEqual(config.state_url, url)
                self.assertNotIn("secret", repr(config))

    def test_workers_need_shared_state(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "workers": 2}, "workers")
        self.assertInvalid({"backends": ["http://a:1"], "replica_id": "a|b"}, "replica_id")

    def test_url_without_host(self) -> None:
        self.assertInvalid({"backends": ["http://"]}, "backends.0.url")

    def test_url_with_credentials(self) -> None:
        self.assertInvalid({"backends": ["http://user:pw@a:1"]}, "backends.0.url")

    def test_bad_port_in_url(self) -> None:
        self.assertInvalid({"backends": ["http://a:99999"]}, "backends.0.url")

    def test_unknown_field(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "bogus": 1}, "bogus")

    def test_unknown_backend_field(self) -> None:
        self.assertInvalid({"backends": [{"url": "http://a:1", "weight": 2}]}, "backends.0.weight")

    def test_negative_timeout(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "queue_timeout_s": -1}, "queue_timeout_s")

    def test_port_out_of_range(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "port": 70000}, "port")

    def test_not_a_number(self) -> None:
        self.assertInvalid(
            {"backends": ["http://a:1"], "poll_interval_s": "soon"}, "poll_interval_s"
        )

    def test_no_backends(self) -> None:
        self.assertInvalid({}, "backends")

    def test_duplicate_backend(self) -> None:
        self.assertInvalid({"backends": ["http://a:1", "http://a:1/"]}, "backends")

    def test_empty_api_key(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "api_keys": [" "]}, "api_keys.0")

    def test_key_needs_exactly_one_secret(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "api_keys": [{"id": "x"}]}, "api_keys.0")
        both = {"key": "k", "sha256": "0" * 64}
        self.assertInvalid({"backends": ["http://a:1"], "api_keys": [both]}, "api_keys.0")

    def test_bad_sha256(self) -> None:
        self.assertInvalid(
            {"backends": ["http://a:1"], "api_keys": [{"sha256": "xyz"}]}, "api_keys.0"
        )

    def test_duplicate_key_ids(self) -> None:
        keys = [{"id": "a", "key": "k1"}, {"id": "a", "key": "k2"}]
        self.assertInvalid({"backends": ["http://a:1"], "api_keys": keys}, "same id")

    def test_bad_trusted_proxy(self) -> None:
        self.assertInvalid(
            {"backends": ["http://a:1"], "trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies"
        )

    def test_tls_needs_both_files(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "tls_certfile": "/etc/hostname"}, "tls")

    def test_unknown_routing(self) -> None:
        self.assertInvalid({"backends": ["http://a:1"], "routing": "random"}, "routing")

    def test_unreadable_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            build_config(config_file=Path("/nonexistent/config.json"))
        self.assertIn("config", str(caught.exception))

    def test_file_not_json(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write("{nope")
            f.flush()
            with self.assertRaises(ConfigError):
                build_config(config_file=Path(f.name))

    def test_file_not_an_object(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write("[1, 2]")
            f.flush()
            with self.assertRaises(ConfigError):
                build_config(config_file=Path(f.name))


class CommandLineTest(unittest.TestCase):
    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llamacpp_ha", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_bad_config_exits_2_with_one_line(self) -> None:
        result = self.run_cli("--backend", "ftp://a:1")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertIn("backends.0.url", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_unknown_flag_exits_2_with_one_line(self) -> None:
        result = self.run_cli("--frobnicate", "1")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertIn("--frobnicate", result.stderr)

    def test_negative_timeout_names_the_field(self) -> None:
        result = self.run_cli("--backend", "http://a:1", "--queue-timeout", "-5")
        self.assertEqual(result.returncode, 2)
        self.assertIn("queue_timeout_s", result.stderr)

    def test_check_config_valid_and_invalid(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump({"backends": ["http://a:1"], "api_keys": ["hidden-key"]}, f)
            f.flush()
            self.assertEqual(main(["check-config", f.name]), 0)
            result = self.run_cli("check-config", f.name)
            self.assertEqual(result.returncode, 0)
            self.assertIn('"http://a:1"', result.stdout)
            self.assertNotIn("hidden-key", result.stdout)
        self.assertEqual(self.run_cli("check-config", "/nonexistent.json").returncode, 2)

    def test_check_config_shows_every_secret_as_a_hash_prefix(self) -> None:
        config = {
            "backends": [{"url": "http://a:1", "api_key": "backend-secret-7731"}],
            "api_keys": ["client-secret-7732", {"id": "ops", "key": "other-secret-7733"}],
            "admin_keys": ["admin-secret-7734"],
            "state_url": "redis://:redis-secret-7735@h:6379/0",
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(config, f)
            f.flush()
            result = self.run_cli("check-config", f.name)
        self.assertEqual(result.returncode, 0, result.stderr)
        for secret in ("7731", "7732", "7733", "7734", "7735"):
            self.assertNotIn(secret, result.stdout)
        shown = json.loads(result.stdout)
        digest = hashlib.sha256(b"client-secret-7732").hexdigest()
        self.assertEqual(shown["api_keys"][0]["sha256"], digest[:12] + "…")
        self.assertEqual(shown["api_keys"][1]["id"], "ops")
        self.assertTrue(shown["backends"][0]["api_key"].startswith("sha256:"))
        self.assertEqual(shown["state_url"], "redis://h:6379/0")

    def test_version(self) -> None:
        result = self.run_cli("--version")
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout, r"^llamacpp-ha \d+\.\d+")

    def test_hash_key_of_a_piped_key_and_a_new_one(self) -> None:
        piped = subprocess.run(
            [sys.executable, "-m", "llamacpp_ha", "hash-key"],
            input="my-key\n", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        self.assertEqual(piped.returncode, 0)
        self.assertIn(hashlib.sha256(b"my-key").hexdigest(), piped.stdout)
        self.assertNotIn("my-key", piped.stdout)
        new = subprocess.run(
            [sys.executable, "-m", "llamacpp_ha", "hash-key"],
            input="", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        key = new.stdout.split("give it to the client): ", 1)[1].split()[0]
        self.assertIn(hashlib.sha256(key.encode()).hexdigest(), new.stdout)
        # The configuration line it prints is accepted as it is.
        line = next(x for x in new.stdout.splitlines() if x.startswith("config: "))
        build_config({"backends": ["http://a:1"], "api_keys": [json.loads(line[8:])]})
