"""Slot-aware load balancer for llama.cpp's llama-server."""

from __future__ import annotations

__version__ = "0.1.0"
