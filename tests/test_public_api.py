"""The package's public surface stays honest: what is exported exists, every
module declares ``__all__``, and the facade works with the embedded Redis."""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
from pathlib import Path

import orbital


def test_root_exports_exist_and_are_sorted() -> None:
    """Everything in ``orbital.__all__`` is importable from the root, listed once."""
    for name in orbital.__all__:
        assert hasattr(orbital, name), name
    assert len(set(orbital.__all__)) == len(orbital.__all__)


def test_every_module_declares_all() -> None:
    """Each library module names its public surface, and those names exist."""
    for info in pkgutil.walk_packages(orbital.__path__, "orbital."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), f"{info.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"


def test_connect_uses_the_embedded_redis_when_none_is_configured(tmp_path: Path) -> None:
    """``orbital.connect()`` with no URL starts an embedded Redis under the home."""
    home = tmp_path / "home"
    o = orbital.connect(redis_url="", home=home, prefix="api")
    try:
        result = o.enqueue("acme/lab", arch="amd64")
        assert result.outcome == "queued"
        assert o.job(result.job_id).state == "queued"
        assert o.status()["queues"] == {"test:amd64": 1}
        frame = o.jobs_frame()
        assert list(frame["id"]) == [result.job_id]
        assert (home / "redis" / "redis.sock").exists()
    finally:
        o.close()
        pid = int((home / "redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGTERM)
