"""Sandboxes: where a job's steps run (local processes, or Docker with a warm pool)."""

from __future__ import annotations

from orbital.sandboxes.base import OutputCallback, Sandbox, SandboxProvider, StepResult

__all__ = ["OutputCallback", "Sandbox", "SandboxProvider", "StepResult"]
