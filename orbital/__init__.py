"""Orbital: keeps a fleet of lab repositories healthy."""

from __future__ import annotations

__version__ = "0.1.0"
