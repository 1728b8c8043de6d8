"""Configuration: a JSON file, then `LLAMACPP_HA_*` environment variables, then CLI flags.

Later sources override earlier ones. Every invalid value is reported as one line naming the
field (`ConfigError`), which the CLI turns into exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class ConfigError(Exception):
    """Invalid configuration, with a one-line message naming the field."""


def validate_backend_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL scheme must be http or https, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {url!r}")
    if parts.username or parts.password:
        raise ValueError("URL must not carry credentials; use the backend's api_key")
    if parts.query or parts.fragment:
        raise ValueError(f"URL must not have a query or fragment: {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"URL has an invalid port: {url!r}") from exc
    return url.rstrip("/")


class BackendConfig(BaseModel):
    """One llama-server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    name: str = ""
    api_key: str | None = Field(default=None, repr=False)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return validate_backend_url(url)

    @model_validator(mode="after")
    def _default_name(self) -> BackendConfig:
        if not self.name:
            parts = urlsplit(self.url)
            object.__setattr__(self, "name", parts.netloc + parts.path)
        return self


class ProxyConfig(BaseSettings):
    """Every setting of the balancer; see the README for each one."""

    model_config = SettingsConfigDict(env_prefix="LLAMACPP_HA_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    backends: list[BackendConfig] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list, repr=False)
    routing: Literal["affinity", "round-robin"] = "affinity"
    poll_interval_s: float = Field(default=1.0, gt=0)
    queue_timeout_s: float = Field(default=60.0, gt=0)
    max_queue: int = Field(default=1024, ge=0)
    session_ttl_s: float = Field(default=900.0, gt=0)
    max_sessions: int = Field(default=100_000, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_byte_timeout_s: float = Field(default=600.0, gt=0)
    idle_timeout_s: float = Field(default=120.0, gt=0)
    request_timeout_s: float = Field(default=1800.0, gt=0)
    write_timeout_s: float = Field(default=30.0, gt=0)
    receive_timeout_s: float = Field(default=30.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    eject_after_failures: int = Field(default=3, ge=1)
    eject_base_s: float = Field(default=5.0, gt=0)
    eject_max_s: float = Field(default=300.0, gt=0)
    readmit_after_polls: int = Field(default=3, ge=1)
    max_ejected_fraction: float = Field(default=0.5, ge=0, le=1)
    max_body_size: int = Field(default=32 * 1024 * 1024, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("backends", mode="before")
    @classmethod
    def _urls_as_backends(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[str]) -> list[str]:
        if any(not key.strip() for key in keys):
            raise ValueError("an API key must not be empty")
        return keys

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
