"""The keys in force, shared by the auth middleware and reload."""

from __future__ import annotations

from .config import ClientKey, ProxyConfig


class Keyring:
    """Read by the auth middleware on every request; `update()` swaps in a new config's keys."""

    def __init__(self, config: ProxyConfig) -> None:
        self.client: list[ClientKey] = []
        self.admin: list[ClientKey] = []
        self.monitor_requires_admin = False
        self.update(config)

    def update(self, config: ProxyConfig) -> None:
        self.client = list(config.api_keys)
        self.admin = list(config.admin_keys)
        self.monitor_requires_admin = config.monitor_requires_admin
