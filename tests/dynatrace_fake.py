"""A local stand-in for the Dynatrace business-events ingest API, with fault injection.

It implements ``POST {base}/api/v2/bizevents/ingest`` as Dynatrace documents it,
strictly: the ``Authorization: Api-Token <token>`` header, a CloudEvents batch
(``application/cloudevents-batch+json``, a JSON array of CloudEvents with
``specversion`` 1.0 and non-empty ``id``, ``source`` and ``type``), 202 with no
body when every event is accepted, and 400 with ``{"errors": [{"index", "id",
"message"}]}`` when some are invalid, in which case the valid ones are accepted
anyway (the documented behaviour). ``partial_accept = False`` models an
endpoint that refuses such a request as a whole, with no per-event detail.

Answers Dynatrace's documentation does not give are this fake's choice: 401
for a wrong or missing token, 404 for another path, 405 for another method,
411 without Content-Length and 415 for another content type.

Faults: :meth:`down` closes the port and every open connection (clients see
"connection refused") until :meth:`up`; ``fail_next`` answers the next requests
with given statuses (429 carries ``Retry-After``); ``poison_ids`` are refused as
invalid; ``max_body_bytes`` answers 413 above a size; ``delay_s`` makes every
answer slow (the events of a slow request are accepted once its body was read,
like a real server that keeps working when the client goes away).

Run on its own (``python -m tests.dynatrace_fake --token T``) it serves until
stdin closes; ``GET /_fake/stats`` then reports how many events it accepted.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import redis

from orbital.events import GROUP, Shipper, cloud_event
from orbital.keys import Keys

__all__ = [
    "FakeDynatrace",
    "IngestRequest",
    "job_events",
    "order_by_subject",
    "outbox_entries",
    "outbox_settled",
    "running",
]

INGEST_PATH = "/api/v2/bizevents/ingest"
BATCH_TYPE = "application/cloudevents-batch+json"
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_KNOWN = {
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "dtcontext",
    "traceparent",
}


@dataclass
class IngestRequest:
    """What one request looked like and how it was answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    accepted_ids: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeDynatrace


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def do_PUT(self) -> None:
        self.server.fake._handle(self)


class FakeDynatrace:
    """The fake ingest server on 127.0.0.1 (a free port unless ``port`` is given).

    Args:
        token: the only API token it accepts.
        base_path: the environment part of the URL before ``/api/v2/...`` (``/e/abc``
            models an ActiveGate).
    """

    def __init__(self, token: str, *, base_path: str = "", port: int = 0) -> None:
        self.token = token
        self.base_path = base_path.rstrip("/")
        self.port = port
        self.lock = threading.Lock()
        self.requests: list[IngestRequest] = []
        self.accepted: list[dict[str, Any]] = []
        self.partial_accept = True
        self.fail_next: list[int] = []
        self.retry_after = "1"
        self.poison_ids: set[str] = set()
        self.max_body_bytes = 0
        self.delay_s = 0.0
        self.body_received = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._down = False
        self._in_flight = 0

    # lifecycle -----------------------------------------------------------------
    @property
    def environment(self) -> str:
        """The ``dt_environment`` URL a client should be configured with."""
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def start(self) -> FakeDynatrace:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def down(self) -> None:
        """Stop listening, let requests being answered finish, then cut every open
        connection. (An outage that cut an answer already computed would make the
        client send that batch again: the same window as a timeout.)"""
        if self._server is None:
            return
        self._down = True
        self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + 30
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def up(self) -> None:
        """Listen again on the same port."""
        self._down = False
        self.start()

    stop = down

    # what it saw ---------------------------------------------------------------
    def accepted_ids(self) -> list[str]:
        with self.lock:
            return [str(e["id"]) for e in self.accepted]

    def duplicates(self) -> dict[str, int]:
        """Event ids accepted more than once, with their counts."""
        return {i: n for i, n in Counter(self.accepted_ids()).items() if n > 1}

    def wait_for(self, count: int, timeout_s: float = 20.0) -> bool:
        """Wait until at least ``count`` events were accepted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.accepted) >= count:
                    return True
            time.sleep(0.01)
        return False

    # one request ---------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self.lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _handle(self, handler: _Handler) -> None:
        with self.lock:
            if self._down:  # a kept-alive connection after down(): as if refused
                handler.close_connection = True
                return
            self._in_flight += 1
        try:
            self._serve(handler)
        finally:
            with self.lock:
                self._in_flight -= 1

    def _serve(self, handler: _Handler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        record = IngestRequest(handler.command, handler.path, headers, b"")
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            record.body = handler.rfile.read(int(length))
        with self.lock:
            self.requests.append(record)
        self.body_received.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        status, extra_headers, payload = self._answer(record, length)
        record.status = status
        self._respond(handler, status, extra_headers, payload)

    def _answer(
        self, record: IngestRequest, length: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        if record.method == "GET" and record.path == "/_fake/stats":
            with self.lock:
                stats = {"accepted": len(self.accepted), "requests": len(self.requests)}
            stats["duplicates"] = len(self.duplicates())
            return 200, {}, json.dumps(stats).encode()
        if record.path != self.base_path + INGEST_PATH:
            return _error(404, f"no endpoint {record.path}")
        if record.method != "POST":
            return _error(405, f"{record.method} is not allowed")
        if record.headers.get("authorization") != f"Api-Token {self.token}":
            return _error(401, "missing or invalid Authorization header: expected Api-Token")
        if record.headers.get("content-type") != BATCH_TYPE:
            return _error(
                415, f"content type {record.headers.get('content-type')!r} is not {BATCH_TYPE}"
            )
        if length is None or not length.isdigit():
            return _error(411, "Content-Length is required")
        with self.lock:
            fault = self.fail_next.pop(0) if self.fail_next else 0
        if fault:
            extra = (
                {"Retry-After": self.retry_after}
                if fault in (429, 503) and self.retry_after
                else {}
            )
            status, _headers, payload = _error(fault, "injected fault")
            return status, extra, payload
        if self.max_body_bytes and len(record.body) > self.max_body_bytes:
            return _error(
                413, f"request body of {len(record.body)} bytes exceeds {self.max_body_bytes}"
            )
        return self._ingest(record)

    def _ingest(self, record: IngestRequest) -> tuple[int, dict[str, str], bytes]:
        try:
            events = json.loads(record.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            return _error(400, f"body is not UTF-8 JSON: {err}")
        if not isinstance(events, list) or not events:
            return _error(400, "a CloudEvents batch must be a non-empty JSON array")
        errors = []
        for index, event in enumerate(events):
            problem = _problem(event) or self._poisoned(event)
            if problem:
                errors.append({"index": index, "id": _id(event), "message": problem})
        if errors and not self.partial_accept:
            return _error(400, "the request contains invalid business events")
        bad = {e["index"] for e in errors}
        good = [e for i, e in enumerate(events) if i not in bad]
        with self.lock:
            self.accepted.extend(good)
            record.accepted_ids = [str(e["id"]) for e in good]
        if errors:
            return 400, {}, json.dumps({"errors": errors}).encode()
        return 202, {}, b""

    def _poisoned(self, event: dict[str, Any]) -> str:
        return "rejected by the test as invalid" if event.get("id") in self.poison_ids else ""

    def _respond(
        self, handler: _Handler, status: int, headers: dict[str, str], payload: bytes
    ) -> None:
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            if payload:
                handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            handler.close_connection = True


def _problem(event: Any) -> str:
    """Why ``event`` is not a CloudEvent Dynatrace takes; empty if it is one."""
    if not isinstance(event, dict):
        return "a CloudEvent must be a JSON object"
    if event.get("specversion") != "1.0":
        return f"specversion must be '1.0', got {event.get('specversion')!r}"
    for name in ("id", "source", "type"):
        if not isinstance(event.get(name), str) or not event[name]:
            return f"required attribute {name!r} is missing or empty"
    for name in event:
        if name not in _KNOWN and not _EXTENSION_NAME.match(name):
            return f"attribute name {name!r} is not a valid CloudEvents name"
    if "data" in event and not isinstance(event["data"], dict):
        return "data must be a JSON object"
    if "time" in event:
        try:
            datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))
        except ValueError:
            return f"time {event['time']!r} is not RFC 3339"
    return ""


def _id(event: Any) -> str:
    return str(event.get("id", "")) if isinstance(event, dict) else ""


def _error(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    return status, {}, json.dumps({"error": {"code": status, "message": message}}).encode()


# Helpers shared by the event tests and the benchmark ---------------------------------


@contextmanager
def running(shipper: Shipper) -> Iterator[Shipper]:
    """Run ``shipper`` in a thread for the duration of the block, then stop it."""
    thread = threading.Thread(target=shipper.run, name="test-shipper", daemon=True)
    thread.start()
    try:
        yield shipper
    finally:
        shipper.stop()
        thread.join(15)
        assert not thread.is_alive(), "the shipper did not stop within 15 s"


def job_events(prefix: str, jobs: int, per_job: int, *, start: int = 0) -> list[dict[str, Any]]:
    """Events of ``jobs`` jobs, interleaved the way a busy fleet writes them: the
    k-th event of every job, then the (k+1)-th... Each carries its sequence number."""
    now = time.time()
    return [
        cloud_event(
            prefix,
            "build.step",
            event_id=f"job-{j}.build.step.{k}",
            subject=f"job-{j}",
            data={"job.id": f"job-{j}", "seq": k},
            now=now,
        )
        for k in range(start, start + per_job)
        for j in range(jobs)
    ]


def order_by_subject(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Event ids per subject, in the order given (first delivery of each id only)."""
    seen: set[str] = set()
    order: dict[str, list[str]] = {}
    for event in events:
        if event["id"] in seen:
            continue
        seen.add(event["id"])
        order.setdefault(event["subject"], []).append(event["id"])
    return order


def main() -> None:
    """Serve the fake on 127.0.0.1 in its own process (the benchmark uses this so the
    fake does not share a GIL with the shipper): prints ``port <n>`` and serves until
    stdin closes. ``GET /_fake/stats`` reports what it accepted."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Local Dynatrace business-events ingest fake")
    parser.add_argument("--token", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    fake = FakeDynatrace(args.token, port=args.port).start()
    print(f"port {fake.port}", flush=True)
    sys.stdin.read()
    fake.down()


if __name__ == "__main__":
    main()


def outbox_entries(client: redis.Redis, keys: Keys) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the outbox stream, oldest first."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.outbox))


def outbox_settled(client: redis.Redis, keys: Keys) -> bool:
    """Nothing left in the outbox and nothing pending in the shipper group."""
    pending = cast(dict[str, Any], client.xpending(keys.outbox, GROUP))
    return client.xlen(keys.outbox) == 0 and pending["pending"] == 0
