"""Configuration: a JSON file, then `LLAMACPP_HA_*` environment variables, then CLI flags.

Later sources override earlier ones. Every invalid value is reported as one line naming the
field (`ConfigError`), which the CLI turns into exit status 2.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .policies import DEFAULT_POLICY, POLICIES


class ConfigError(Exception):
    """Invalid configuration, with a one-line message naming the field."""


def validate_backend_url(url: str) -> str:
    parts = urlsplit(url)
    # Errors name the URL without its credentials: they reach logs and admin answers.
    shown = without_credentials(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL scheme must be http or https, got {shown!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {shown!r}")
    if parts.username or parts.password:
        raise ValueError("URL must not carry credentials; use the backend's api_key")
    if parts.query or parts.fragment:
        raise ValueError(f"URL must not have a query or fragment: {shown!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"URL has an invalid port: {shown!r}") from exc
    return url.rstrip("/")


STATE_SCHEMES = ("redis", "rediss", "unix")


def check_state_url(url: str) -> str:
    """`url` if it names a Redis we could talk to, else ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in STATE_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(STATE_SCHEMES)}, got {parts.scheme!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path")
        return url
    if not parts.hostname:
        raise ValueError("the URL has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError("the URL has an invalid port") from exc
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the database must be a number, got {database!r}")
    return url


def without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("@")[-1]
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


class BackendConfig(BaseModel):
    """One llama-server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    name: str = ""
    api_key: str | None = Field(default=None, repr=False)
    # For https backends: a CA bundle to trust (a private CA), or no verification at all.
    ca_file: Path | None = None
    tls_verify: bool = True
    # What its host prompt cache (--cache-ram) holds, in tokens; llama-server does not say.
    # The default is llama.cpp's 8192 MiB of an 8B model's KV cache at 128 KiB per token.
    host_cache_tokens: int = Field(default=65_536, ge=0)
    # Requests it takes at once when it reports no slots (neither /slots nor /props): a
    # swapper such as llama-swap, another OpenAI-compatible server.
    slots: int | None = Field(default=None, ge=1, le=4096)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return validate_backend_url(url)

    @model_validator(mode="after")
    def _tls_options(self) -> BackendConfig:
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file: no such file {self.ca_file}")
        return self

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What aiohttp's `ssl=` takes for this backend: True is the default verification."""
        if not self.tls_verify:
            return False
        if self.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.ca_file))
        return True

    @model_validator(mode="after")
    def _default_name(self) -> BackendConfig:
        if not self.name:
            parts = urlsplit(self.url)
            object.__setattr__(self, "name", parts.netloc + parts.path)
        return self


class ClientKey(BaseModel):
    """A key clients (or admins) present; given in clear or as its SHA-256, never logged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = ""
    key: str | None = Field(default=None, repr=False, exclude=True)
    sha256: str | None = Field(default=None, repr=False)
    max_concurrent: int | None = Field(default=None, gt=0)
    requests_per_minute: int | None = Field(default=None, gt=0)
    priority: int = Field(default=0, ge=-100, le=100)

    @model_validator(mode="after")
    def _one_secret(self) -> ClientKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' and 'sha256'")
        if self.key is not None:
            if not self.key.strip():
                raise ValueError("a key must not be empty")
            object.__setattr__(self, "sha256", hashlib.sha256(self.key.encode()).hexdigest())
            object.__setattr__(self, "key", None)  # keep only the digest in memory
        digest = (self.sha256 or "").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("sha256 must be 64 hexadecimal digits")
        object.__setattr__(self, "sha256", digest)
        if not self.id:
            object.__setattr__(self, "id", f"key-{digest[:8]}")
        return self

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256 or "")


def _keys_from_strings(value: Any) -> Any:
    if isinstance(value, list):
        return [{"key": item} if isinstance(item, str) else item for item in value]
    return value


# How a new value of a ProxyConfig field takes effect on reload: LIVE at once, or RESTART (read
# at start only; the reload reports it). Every field says which (reload.py plans from it).
LIVE: JsonDict = {"reload": "live"}
RESTART: JsonDict = {"reload": "restart"}


class ProxyConfig(BaseSettings):
    """Every setting of the balancer; see the README for each one."""

    model_config = SettingsConfigDict(env_prefix="LLAMACPP_HA_", extra="forbid")

    host: str = Field(default="127.0.0.1", json_schema_extra=RESTART)
    port: int = Field(default=8000, ge=0, le=65535, json_schema_extra=RESTART)
    backends: list[BackendConfig] = Field(default_factory=list, json_schema_extra=LIVE)
    api_keys: list[ClientKey] = Field(default_factory=list, repr=False, json_schema_extra=LIVE)
    admin_keys: list[ClientKey] = Field(default_factory=list, repr=False, json_schema_extra=LIVE)
    monitor_requires_admin: bool = Field(default=False, json_schema_extra=LIVE)
    trusted_proxies: list[str] = Field(default_factory=list, json_schema_extra=LIVE)
    cors_origins: list[str] = Field(default_factory=list, json_schema_extra=RESTART)
    tls_certfile: Path | None = Field(default=None, json_schema_extra=RESTART)
    tls_keyfile: Path | None = Field(default=None, json_schema_extra=RESTART)
    max_header_size: int = Field(default=32 * 1024, ge=1024, json_schema_extra=LIVE)
    max_connections: int = Field(default=4096, ge=1, json_schema_extra=RESTART)
    max_json_depth: int = Field(default=64, ge=2, json_schema_extra=LIVE)
    max_tokens_cap: int | None = Field(default=None, gt=0, json_schema_extra=LIVE)
    log_format: Literal["text", "json"] = Field(default="text", json_schema_extra=RESTART)
    routing: str = Field(default=DEFAULT_POLICY, json_schema_extra=LIVE)
    poll_interval_s: float = Field(default=1.0, gt=0, json_schema_extra=LIVE)
    poll_timeout_s: float = Field(default=1.0, gt=0, json_schema_extra=LIVE)
    unhealthy_after_polls: int = Field(default=2, ge=1, json_schema_extra=LIVE)
    healthy_after_polls: int = Field(default=1, ge=1, json_schema_extra=LIVE)
    queue_timeout_s: float = Field(default=60.0, gt=0, json_schema_extra=LIVE)
    max_queue: int = Field(default=1024, ge=0, json_schema_extra=LIVE)
    session_ttl_s: float = Field(default=900.0, gt=0, json_schema_extra=LIVE)
    max_sessions: int = Field(default=100_000, gt=0, json_schema_extra=LIVE)
    max_cache_wait_s: float = Field(default=0.5, ge=0, json_schema_extra=LIVE)
    reorder_window_s: float = Field(default=1.0, ge=0, json_schema_extra=LIVE)
    reorder_max: int = Field(default=4, ge=0, json_schema_extra=LIVE)
    pin_slots: bool = Field(default=False, json_schema_extra=LIVE)
    connect_timeout_s: float = Field(default=5.0, gt=0, json_schema_extra=LIVE)
    first_byte_timeout_s: float = Field(default=600.0, gt=0, json_schema_extra=LIVE)
    idle_timeout_s: float = Field(default=120.0, gt=0, json_schema_extra=LIVE)
    request_timeout_s: float = Field(default=1800.0, gt=0, json_schema_extra=LIVE)
    write_timeout_s: float = Field(default=30.0, gt=0, json_schema_extra=LIVE)
    receive_timeout_s: float = Field(default=30.0, gt=0, json_schema_extra=LIVE)
    header_timeout_s: float = Field(default=10.0, gt=0, json_schema_extra=RESTART)
    keepalive_timeout_s: float = Field(default=5.0, gt=0, json_schema_extra=RESTART)
    shutdown_grace_s: float = Field(default=30.0, ge=0, json_schema_extra=LIVE)
    max_attempts: int = Field(default=3, ge=1, json_schema_extra=LIVE)
    # A stream whose backend breaks is continued on another backend (resume.py), this often.
    resume_streams: bool = Field(default=True, json_schema_extra=LIVE)
    max_resumes: int = Field(default=1, ge=0, le=10, json_schema_extra=LIVE)
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1, json_schema_extra=LIVE)
    eject_after_failures: int = Field(default=3, ge=1, json_schema_extra=LIVE)
    eject_base_s: float = Field(default=5.0, gt=0, json_schema_extra=LIVE)
    eject_max_s: float = Field(default=300.0, gt=0, json_schema_extra=LIVE)
    readmit_after_polls: int = Field(default=3, ge=1, json_schema_extra=LIVE)
    max_ejected_fraction: float = Field(default=0.5, ge=0, le=1, json_schema_extra=LIVE)
    max_body_size: int = Field(default=32 * 1024 * 1024, gt=0, json_schema_extra=LIVE)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", json_schema_extra=LIVE
    )
    # Several replicas (replicas.py): where they share state, how long a lease outlives a
    # replica that died, this replica's name, and worker processes on one machine.
    state_url: str | None = Field(default=None, repr=False, json_schema_extra=RESTART)
    lease_ttl_s: float = Field(default=10.0, ge=0.5, json_schema_extra=RESTART)
    replica_id: str | None = Field(
        default=None, min_length=1, max_length=100, json_schema_extra=RESTART
    )
    workers: int = Field(default=1, ge=1, le=64, json_schema_extra=RESTART)

    @field_validator("backends", mode="before")
    @classmethod
    def _urls_as_backends(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("routing")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; one of {', '.join(POLICIES)}")
        return value

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str | None) -> str | None:
        return None if value is None else check_state_url(value)

    @field_validator("replica_id")
    @classmethod
    def _replica_name(cls, value: str | None) -> str | None:
        if value is not None and not all(c.isalnum() or c in "-_.:" for c in value):
            raise ValueError("letters, digits and - _ . : only")
        return value

    @model_validator(mode="after")
    def _workers_share(self) -> ProxyConfig:
        if self.workers > 1 and self.state_url is None:
            raise ValueError("workers: more than one worker needs state_url to share state")
        return self

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _keys_as_objects(cls, value: Any) -> Any:
        return _keys_from_strings(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # ValueError names the bad entry
        return values

    @model_validator(mode="after")
    def _tls_pair(self) -> ProxyConfig:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        for path in (self.tls_certfile, self.tls_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"tls: no such file {path}")
        ids = [k.id for k in self.api_keys] + [k.id for k in self.admin_keys]
        if len(ids) != len(set(ids)):
            raise ValueError("api_keys: two keys have the same id")
        return self

    @model_validator(mode="after")
    def _unique_backends(self) -> ProxyConfig:
        for attr in ("name", "url"):
            seen: set[str] = set()
            for backend in self.backends:
                value = getattr(backend, attr)
                if value in seen:
                    raise ValueError(f"backends: duplicate {attr} {value!r}")
                seen.add(value)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: CLI flags (passed as init values), environment, file.
        return (init_settings, env_settings, JsonConfigSettingsSource(settings_cls))


def _read_file(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a JSON object")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    field = ".".join(str(part) for part in first["loc"])
    # Model-level checks (duplicates) have no location; their message names the field.
    return f"{field}: {message}" if field else message


def build_config(
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    require_backends: bool = True,
) -> ProxyConfig:
    """Merge the file, the environment and `overrides` (the CLI) into a checked config."""
    settings_cls: type[ProxyConfig] = ProxyConfig
    if config_file is not None:
        _read_file(config_file)

        class _FromFile(ProxyConfig):
            model_config = SettingsConfigDict(json_file=config_file)

        settings_cls = _FromFile
    try:
        config = settings_cls(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    if require_backends and not config.backends:
        raise ConfigError("backends: at least one backend is required (--backend URL)")
    return ProxyConfig.model_construct(**dict(config))
