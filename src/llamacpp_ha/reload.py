"""Reload as a plan: what differs between two configurations, and how each difference applies.

`plan_reload(old, new)` is pure: it compares every field, and the backends by name. Whether a
field's new value applies live or needs a restart is that field's own metadata in ProxyConfig
(`config.LIVE`, `config.RESTART`). `Balancer.reload` applies the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import BackendConfig, ProxyConfig

ReloadMode = Literal["live", "restart"]


@dataclass(frozen=True)
class BackendChanges:
    """The fleet's changes, by backend name."""

    added: tuple[BackendConfig, ...] = ()
    removed: tuple[str, ...] = ()
    # The new configuration of each backend that keeps its name (and so its state).
    changed: tuple[BackendConfig, ...] = ()


@dataclass(frozen=True)
class ReloadPlan:
    """Every field whose value differs (in ProxyConfig's order), split by how it applies."""

    changed: tuple[str, ...]
    live: tuple[str, ...]
    restart: tuple[str, ...]
    backends: BackendChanges


def reload_mode(field: str) -> ReloadMode:
    """How a new value of ProxyConfig's `field` takes effect, as its metadata says."""
    extra = ProxyConfig.model_fields[field].json_schema_extra
    mode = extra.get("reload") if isinstance(extra, dict) else None
    if mode == "live":
        return "live"
    if mode == "restart":
        return "restart"
    raise LookupError(f"ProxyConfig.{field} has no reload metadata (config.LIVE or RESTART)")


def plan_reload(old: ProxyConfig, new: ProxyConfig) -> ReloadPlan:
    changed = tuple(f for f in ProxyConfig.model_fields if getattr(old, f) != getattr(new, f))
    modes = {field: reload_mode(field) for field in changed}
    before = {b.name: b for b in old.backends}
    after = {b.name: b for b in new.backends}
    return ReloadPlan(
        changed=changed,
        live=tuple(f for f in changed if modes[f] == "live"),
        restart=tuple(f for f in changed if modes[f] == "restart"),
        backends=BackendChanges(
            added=tuple(b for name, b in after.items() if name not in before),
            removed=tuple(name for name in before if name not in after),
            changed=tuple(b for name, b in after.items() if name in before and before[name] != b),
        ),
    )
