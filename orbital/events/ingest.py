"""The HTTP side of the shipper: one POST of a CloudEvents batch to Dynatrace.

``POST {dt_environment}/api/v2/bizevents/ingest`` with ``Authorization:
Api-Token <token>`` and ``Content-Type: application/cloudevents-batch+json``;
the body is a JSON array of CloudEvents. Dynatrace answers 202 when every event
was accepted, and 400 with ``{"errors": [{"index": ..., "message": ...}]}`` when
some were invalid (the valid ones are accepted all the same); 413 means the
request is too large, 429 that it came too fast (with ``Retry-After``).

:class:`IngestClient` keeps one connection open between requests and never
raises for a failed request: a network error comes back as status 0, so the
shipper decides what to do with every outcome in one place. The token is held
only in the request header and is never part of a repr, a log line or an error.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import time
import urllib.parse
from dataclasses import dataclass

from orbital.errors import ConfigError
from orbital.events.model import ORBITAL_VERSION

__all__ = ["BATCH_CONTENT_TYPE", "INGEST_PATH", "IngestClient", "IngestResponse"]

logger = logging.getLogger(__name__)

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
INGEST_PATH = "/api/v2/bizevents/ingest"
_MAX_RESPONSE_BYTES = 256 * 1024
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
)


@dataclass(frozen=True)
class IngestResponse:
    """The outcome of one request: ``status`` 0 means no HTTP answer arrived
    (``error`` says why: refused, reset, timed out)."""

    status: int
    body: bytes = b""
    retry_after_s: float | None = None
    error: str = ""
    elapsed_s: float = 0.0

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    def describe(self) -> str:
        """A short phrase for log lines: ``HTTP 503`` or ``no answer (refused)``."""
        if self.status == 0:
            return f"no answer ({self.error})"
        return f"HTTP {self.status}"


class IngestClient:
    """Posts batches to one Dynatrace environment.

    Args:
        environment: the environment URL (``ORBITAL_DT_ENVIRONMENT``), with or
            without a trailing slash.
        token: an access token with the ``bizevents.ingest`` scope.
        timeout_s: connect and read timeout of one request.

    Raises:
        ConfigError: if the URL is not http(s) with a host, or the token is empty.
    """

    def __init__(self, environment: str, token: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(environment.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"dt_environment (ORBITAL_DT_ENVIRONMENT) = {environment!r}: expected an "
                "http(s) URL such as https://abc12345.live.dynatrace.com"
            )
        if parts.query or parts.fragment:
            raise ConfigError(
                f"dt_environment (ORBITAL_DT_ENVIRONMENT) = {environment!r}: must not carry "
                "a query or fragment"
            )
        if not token:
            raise ConfigError(
                "dt_api_token (ORBITAL_DT_API_TOKEN) is empty: the shipper needs an access "
                "token with the bizevents.ingest scope"
            )
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            logger.warning(
                "ingest: %s is plain http; the API token crosses the network unencrypted",
                parts.hostname,
            )
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + INGEST_PATH
        self._timeout_s = timeout_s
        self._headers = {
            "Authorization": f"Api-Token {token}",
            "Content-Type": BATCH_CONTENT_TYPE,
            "Accept": "application/json",
            "User-Agent": f"orbital-shipper/{ORBITAL_VERSION}",
        }
        self._conn: http.client.HTTPConnection | None = None

    @property
    def url(self) -> str:
        """The ingest URL (no credentials in it)."""
        port = f":{self._port}" if self._port else ""
        return f"{self._scheme}://{self._host}{port}{self._path}"

    def __repr__(self) -> str:
        return f"IngestClient({self.url!r})"

    def post(self, body: bytes) -> IngestResponse:
        """Send one batch body and return the outcome; never raises for network
        or HTTP errors."""
        started = time.monotonic()
        reused = self._conn is not None
        try:
            return self._exchange(body, started)
        except _STALE_CONNECTION:
            self.close()
            if not reused:
                return IngestResponse(
                    0, error="connection closed by the server", elapsed_s=time.monotonic() - started
                )
        except (OSError, http.client.HTTPException) as err:
            self.close()
            return IngestResponse(
                0, error=_network_error(err), elapsed_s=time.monotonic() - started
            )
        # A kept-alive connection the server had already closed fails on first use;
        # try once more on a fresh one before reporting a network error.
        try:
            return self._exchange(body, started)
        except (OSError, http.client.HTTPException) as err:
            self.close()
            return IngestResponse(
                0, error=_network_error(err), elapsed_s=time.monotonic() - started
            )

    def close(self) -> None:
        """Drop the kept-alive connection (the next request opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, body: bytes, started: float) -> IngestResponse:
        conn = self._connection()
        conn.request("POST", self._path, body=body, headers=self._headers)
        response = conn.getresponse()
        payload = response.read(_MAX_RESPONSE_BYTES)
        if response.will_close or len(payload) == _MAX_RESPONSE_BYTES:
            self.close()
        retry_after = _retry_after_s(response.getheader("Retry-After"))
        elapsed = time.monotonic() - started
        return IngestResponse(response.status, payload, retry_after, elapsed_s=elapsed)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self._host, self._port, timeout=self._timeout_s)
        return self._conn


def _retry_after_s(value: str | None) -> float | None:
    """Parse ``Retry-After``: delta seconds or an HTTP date; None if absent or unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _network_error(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, ConnectionResetError | BrokenPipeError | http.client.RemoteDisconnected):
        return "connection closed by the server"
    return f"{type(err).__name__}: {err}"
