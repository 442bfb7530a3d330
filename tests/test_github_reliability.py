"""Hostile input against a running webhook receiver: forged, oversize, malformed and
replayed deliveries are each refused with the right status, enqueue nothing, and do
not stop the receiver from answering good deliveries in the same burst."""

from __future__ import annotations

import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from orbital.github.signature import sign
from orbital.settings import Settings
from tests.conftest import free_port
from tests.test_github_harness import (
    FORM,
    JSON,
    SECRET,
    Receiver,
    active_jobs,
    edited,
    headers,
    payload,
    raw_payload,
    receiver_settings,
    write_fleet,
)

pytestmark = pytest.mark.shared

LIMIT = 64 * 1024


@pytest.fixture
def receiver(settings: Settings, tmp_path: Path) -> Iterator[Receiver]:
    """A receiver with a 64 KiB body limit and the test fleet registry."""
    fleet = write_fleet(tmp_path / "repos.yaml")
    own = receiver_settings(
        settings, free_port(), fleet_file=str(fleet), webhook_max_body_bytes=LIMIT
    )
    service = Receiver(own)
    yield service.start()
    service.stop()


def raw_exchange(port: int, head: bytes, body_chunks: Sequence[bytes] = ()) -> int:
    """Send a hand-made request (head, then body chunks) and return the answer's status;
    sending stops as soon as the server answers or closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    return int(answer.split(b" ", 2)[1])


def _head(hdrs: Mapping[str, str | bytes], extra: str = "") -> bytes:
    lines = [b"POST /webhook HTTP/1.1", b"Host: 127.0.0.1"]
    for name, value in hdrs.items():
        lines.append(
            name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
        )
    return b"\r\n".join(lines) + extra.encode() + b"\r\n\r\n"


def hostile_requests(
    receiver: Receiver, shared_dir: Path
) -> list[tuple[str, int, Callable[[], int]]]:
    """(name, expected status, send) for every kind of bad delivery."""
    ping = raw_payload(shared_dir, "ping.payload.json")
    good = headers(ping, "ping")
    wrong = {**good, "X-Hub-Signature-256": sign(b"not-the-secret", ping)}
    post = receiver.post

    def send(body: bytes, hdrs: dict[str, str]) -> Callable[[], int]:
        return lambda: receiver.request("POST", "/webhook", body, hdrs)[0]

    def signed(body: bytes, event: str = "ping", **kw: Any) -> Callable[[], int]:
        return lambda: post(body, event, **kw)[0]

    def with_sig(value: str | bytes) -> Callable[[], int]:
        hdrs: dict[str, str | bytes] = {**good, "X-Hub-Signature-256": value,
                                        "Content-Length": str(len(ping))}  # fmt: skip
        return lambda: raw_exchange(receiver.port, _head(hdrs), [ping])

    digest = sign(SECRET.encode(), ping).removeprefix("sha256=")
    no_sig = {k: v for k, v in good.items() if k != "X-Hub-Signature-256"}
    big = b'{"zen": "' + b"x" * (LIMIT + 10) + b'"}'
    oversize_head = {**good, "Content-Length": str(50 * 1024 * 1024)}
    chunked_head = dict(good)
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"y" * 16 * 1024)
    return [
        # forged: every way the signature can be wrong is 401
        ("wrong secret", 401, send(ping, wrong)),
        ("no signature", 401, send(ping, no_sig)),
        ("signature of other bytes", 401, send(ping + b" ", good)),
        ("sha1 scheme", 401, with_sig("sha1=" + digest[:40])),
        ("truncated digest", 401, with_sig("sha256=" + digest[:63])),
        ("non-hex digest", 401, with_sig("sha256=" + "z" * 64)),
        ("non-ascii digest", 401, with_sig("sha256=é".encode() + digest[:62].encode())),
        ("latin-1 byte", 401, with_sig(b"sha256=\xe9" + digest[1:].encode())),
        ("empty signature", 401, with_sig("")),
        ("upper-case scheme", 401, with_sig("SHA256=" + digest)),
        # oversize: refused from Content-Length before the body is sent, or mid-stream
        ("declared oversize", 413, lambda: raw_exchange(receiver.port, _head(oversize_head))),
        ("signed oversize", 413, signed(big)),
        ("chunked oversize", 413, lambda: raw_exchange(
            receiver.port, _head(chunked_head, "\r\nTransfer-Encoding: chunked"),
            [chunk] * 8 + [b"0\r\n\r\n"])),
        # malformed (all correctly signed)
        ("broken JSON", 400, signed(b'{"zen": ')),
        ("JSON array", 400, signed(b"[1, 2]")),
        ("not UTF-8", 400, signed(b'{"zen": "\xff\xfe"}')),
        ("form without payload", 400, signed(b"other=1", content_type=FORM)),
        ("missing event header", 400, send(ping, {k: v for k, v in good.items()
                                                  if k != "X-GitHub-Event"})),
        ("bad delivery id", 400, signed(ping, delivery="../../etc/passwd")),
        ("unsupported type", 415, signed(ping, content_type="text/plain")),
        ("bad charset", 415, signed(ping, content_type=JSON + "; charset=latin-1")),
        ("shell in branch", 422, signed(
            edited(payload(shared_dir, "pull_request.opened.payload.json"),
                   lambda d: d["pull_request"]["head"].update(ref="main;reboot")),
            "pull_request")),
    ]  # fmt: skip


def good_issue(shared_dir: Path, number: int) -> bytes:
    """A bug issue with its own number: each one must start exactly one job."""
    data = payload(shared_dir, "issues.opened.payload.json")
    data["issue"]["number"] = number
    return json.dumps(data).encode()


def test_burst_of_hostile_deliveries_is_refused_while_good_ones_are_served(
    receiver: Receiver, shared_dir: Path, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Forged, oversize, malformed and replayed deliveries mixed with good ones, sent
    from 8 threads: every bad one gets its status and enqueues nothing; every good one
    is answered 202 in under a second and starts its one job; refusals are logged a
    line per status per second, not one each."""
    caplog.set_level(logging.INFO, logger="orbital.github")
    replayed = good_issue(shared_dir, 4242)
    assert receiver.post(replayed, "issues", delivery="replayed-1")[0] == 202

    hostile = hostile_requests(receiver, shared_dir)
    work: list[tuple[str, int, Callable[[], int]]] = [item for item in hostile for _ in range(6)]
    work += [("replay", 200, lambda: receiver.post(replayed, "issues", delivery="replayed-1")[0])
             for _ in range(40)]  # fmt: skip
    goods = []
    for number in range(100, 160):
        body = good_issue(shared_dir, number)
        goods.append(("good", 202, lambda b=body: receiver.post(b, "issues")[0]))
    work += goods
    random.Random(7).shuffle(work)

    def run(item: tuple[str, int, Callable[[], int]]) -> tuple[str, int, int, float]:
        name, expected, call = item
        started = time.monotonic()
        status = call()
        return name, expected, status, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, work))

    wrong = sorted({(n, e, s) for n, e, s, _ in results if e != s})
    assert wrong == [], f"(case, expected, got): {wrong}"
    slowest_good = max(t for n, _, _, t in results if n == "good")
    assert slowest_good < 1.0, f"slowest good delivery took {slowest_good:.3f} s"

    jobs = active_jobs(client, receiver.settings)
    assert len(jobs) == 1 + len(goods)
    assert sorted(j.params["issue_number"] for j in jobs) == [*range(100, 160), 4242]
    assert receiver.request("GET", "/healthz") == (200, {"status": "ok"})
    assert receiver.post(good_issue(shared_dir, 999), "issues")[0] == 202
    forged = sum(1 for n, e, _, _ in results if e == 401)
    lines_401 = [m for m in caplog.messages if "refused with 401" in m]
    assert 1 <= len(lines_401) < forged / 4


def test_declared_oversize_body_is_refused_before_it_is_sent(receiver: Receiver) -> None:
    """A Content-Length over the limit is answered 413 while the client has sent only
    the headers: the receiver never waits for (or buffers) the body."""
    hdrs: dict[str, str | bytes] = {
        "Content-Type": JSON,
        "X-GitHub-Event": "ping",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256=" + "0" * 64,
        "Content-Length": str(10 * 1024 * 1024 * 1024),
    }
    started = time.monotonic()

    assert raw_exchange(receiver.port, _head(hdrs)) == 413
    assert time.monotonic() - started < 1.0


def test_control_characters_in_the_signature_are_refused_by_the_http_parser(
    receiver: Receiver, shared_dir: Path
) -> None:
    """A header with control characters is not valid HTTP: 400 from the parser,
    never a 500, and the receiver keeps serving."""
    ping = raw_payload(shared_dir, "ping.payload.json")
    hdrs: dict[str, str | bytes] = {**headers(ping, "ping"), "Content-Length": str(len(ping))}
    hdrs["X-Hub-Signature-256"] = b"sha256=\x01\x02"

    assert raw_exchange(receiver.port, _head(hdrs), [ping]) == 400
    assert receiver.post(ping, "ping")[0] == 200
