"""The shipper against a local Dynatrace ingest fake: format, batching, retries, refusals."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orbital.events import (
    BATCH_CONTENT_TYPE,
    Shipper,
    dead_letter_records,
    emit,
    replay_dead_letters,
)
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings
from tests.dynatrace_fake import (
    FakeDynatrace,
    job_events,
    order_by_subject,
    outbox_entries,
    outbox_settled,
    running,
)

TOKEN = "dt0c01.TESTTOKEN4SHIPPER.abcdefabcdef"


@pytest.fixture
def fake() -> Iterator[FakeDynatrace]:
    """The fake ingest API, as an ActiveGate-style environment URL."""
    server = FakeDynatrace(TOKEN, base_path="/e/abc12345").start()
    yield server
    server.down()


def shipper_settings(settings: Settings, fake: FakeDynatrace, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "dt_environment": fake.environment,
        "dt_api_token": TOKEN,
        "shipper_poll_s": 0.05,
        "shipper_backoff_s": 0.02,
        "shipper_backoff_max_s": 0.2,
        "shipper_lock_ttl_s": 1.0,
        "shipper_timeout_s": 5.0,
        "shipper_name": "test-shipper",
    }
    values.update(overrides)
    return dataclasses.replace(settings, **values)


def emit_all(client: redis.Redis, settings: Settings, events: list[dict[str, Any]]) -> None:
    keys = Keys(settings.prefix)
    for event in events:
        emit(client, keys, event)


def settled(client: redis.Redis, settings: Settings) -> bool:
    return outbox_settled(client, Keys(settings.prefix))


def wait_until(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_request_has_the_exact_headers_and_body(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """One POST to {env}/api/v2/bizevents/ingest with Api-Token auth, the CloudEvents
    batch content type and the stored events, unchanged and in order, as a JSON array."""
    events = job_events(settings.prefix, jobs=2, per_job=3)
    emit_all(client, settings, events)
    stored = [fields[b"e"] for _id, fields in outbox_entries(client, Keys(settings.prefix))]

    with running(Shipper(shipper_settings(settings, fake))):
        assert fake.wait_for(6)
        wait_until(lambda: settled(client, settings))

    [request] = fake.requests
    assert request.method == "POST"
    assert request.path == "/e/abc12345/api/v2/bizevents/ingest"
    assert request.headers["authorization"] == f"Api-Token {TOKEN}"
    assert request.headers["content-type"] == BATCH_CONTENT_TYPE
    assert request.headers["content-length"] == str(len(request.body))
    assert request.body == b"[" + b",".join(stored) + b"]"
    assert json.loads(request.body) == events
    assert request.status == 202


def test_batches_respect_the_count_and_byte_limits(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """Batches hold at most shipper_batch_size events and shipper_max_batch_bytes bytes,
    and every event goes exactly once, in stream order."""
    events = job_events(settings.prefix, jobs=1, per_job=23)
    emit_all(client, settings, events)
    one_event = len(json.dumps(events[0], separators=(",", ":")))
    max_bytes = 3 * one_event + 10

    with running(
        Shipper(
            shipper_settings(
                settings, fake, shipper_batch_size=10, shipper_max_batch_bytes=max_bytes
            )
        )
    ):
        assert fake.wait_for(23)

    sizes = [len(json.loads(r.body)) for r in fake.requests]
    assert max(sizes) == 3
    assert sum(sizes) == 23
    assert all(len(r.body) <= max_bytes for r in fake.requests)
    assert fake.accepted_ids() == [e["id"] for e in events]
    assert fake.duplicates() == {}


def test_429_and_5xx_are_retried_and_retry_after_is_honoured(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, caplog: pytest.LogCaptureFixture
) -> None:
    """429 (with Retry-After: 1), 500 and 503 are retried; the wait after the 429 is at
    least a second; the events arrive once."""
    emit_all(client, settings, job_events(settings.prefix, jobs=2, per_job=5))
    fake.fail_next = [429, 500, 503]
    fake.retry_after = "1"
    caplog.set_level(logging.WARNING, "orbital.events")

    with running(Shipper(shipper_settings(settings, fake))):
        assert fake.wait_for(10)

    statuses = [r.status for r in fake.requests]
    assert statuses == [429, 500, 503, 202]
    assert fake.requests[1].at - fake.requests[0].at >= 1.0
    assert fake.duplicates() == {}
    assert len(fake.accepted_ids()) == 10
    assert "HTTP 429" in caplog.text
    assert "Retry-After 1 s" in caplog.text
    assert "retry 3 in" in caplog.text


def test_network_errors_are_retried_until_the_api_answers(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """With the ingest port closed the shipper keeps retrying; once it opens, every event
    arrives once."""
    fake.down()
    emit_all(client, settings, job_events(settings.prefix, jobs=3, per_job=4))

    with running(shipper := Shipper(shipper_settings(settings, fake))):
        wait_until(lambda: shipper.stats.retries >= 3)
        fake.up()
        assert fake.wait_for(12)

    assert fake.duplicates() == {}
    assert len(fake.accepted_ids()) == 12


def test_invalid_events_are_dead_lettered_with_the_reason(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """On a 400 with per-event errors the valid events count as delivered (Dynatrace
    accepted them) and the invalid ones move to the dead-letter list with the API's reason."""
    keys = Keys(settings.prefix)
    events = job_events(settings.prefix, jobs=1, per_job=6)
    emit_all(client, settings, events[:3])
    client.xadd(
        keys.outbox, {"e": json.dumps({"specversion": "1.0", "id": "no-type", "source": "x"})}
    )
    emit_all(client, settings, events[3:])
    fake.poison_ids = {events[4]["id"]}

    with running(Shipper(shipper_settings(settings, fake))):
        wait_until(lambda: client.llen(keys.dead_letters) == 2 and settled(client, settings))

    assert len(fake.requests) == 1  # the valid events were not sent again
    assert fake.accepted_ids() == [e["id"] for e in events if e["id"] != events[4]["id"]]
    dead = dead_letter_records(client, keys)
    assert [d["event_id"] for d in dead] == ["no-type", events[4]["id"]]
    assert dead[0]["reason"] == "HTTP 400: required attribute 'type' is missing or empty"
    assert dead[1]["reason"] == "HTTP 400: rejected by the test as invalid"
    assert all(d["status"] == 400 and d["stream_id"] and d["dead_at"] for d in dead)
    assert json.loads(dead[1]["raw"]) == events[4]


def test_a_batch_refused_as_a_whole_is_bisected(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """When a 400 carries no per-event detail the batch is halved until the bad events
    are alone: they are dead-lettered, every good event arrives once and in order."""
    keys = Keys(settings.prefix)
    events = job_events(settings.prefix, jobs=2, per_job=8)
    emit_all(client, settings, events)
    fake.partial_accept = False
    bad = {events[3]["id"], events[12]["id"]}
    fake.poison_ids = bad

    with running(Shipper(shipper_settings(settings, fake))):
        wait_until(lambda: client.llen(keys.dead_letters) == 2 and settled(client, settings))

    assert fake.accepted_ids() == [e["id"] for e in events if e["id"] not in bad]
    assert fake.duplicates() == {}
    assert {d["event_id"] for d in dead_letter_records(client, keys)} == bad
    assert all("invalid business events" in d["reason"] for d in dead_letter_records(client, keys))


def test_a_batch_too_large_is_split(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """A 413 halves the batch and later batches stay under the refused size (no more
    413s); an event too large on its own is dead-lettered; the rest arrive once, in order."""
    keys = Keys(settings.prefix)
    events = job_events(settings.prefix, jobs=2, per_job=10)
    events[7]["data"]["blob"] = "x" * 5000
    emit_all(client, settings, events)
    fake.max_body_bytes = 4 * len(json.dumps(events[0])) + 100

    later = job_events(settings.prefix, jobs=2, per_job=10, start=10)

    with running(shipper := Shipper(shipper_settings(settings, fake))):
        wait_until(lambda: client.llen(keys.dead_letters) == 1 and settled(client, settings))
        first_wave_requests = len(fake.requests)
        emit_all(client, settings, later)
        assert fake.wait_for(39)

    assert fake.accepted_ids() == [e["id"] for i, e in enumerate(events + later) if i != 7]
    assert fake.duplicates() == {}
    [dead] = dead_letter_records(client, keys)
    assert dead["event_id"] == events[7]["id"]
    assert dead["status"] == 413
    assert dead["reason"].startswith("HTTP 413: the event alone is too large")
    assert shipper.stats.splits >= 2
    assert {r.status for r in fake.requests[first_wave_requests:]} == {202}


def test_an_entry_that_is_not_json_is_dead_lettered_unsent(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """A corrupt outbox entry never reaches the API and does not block the others."""
    keys = Keys(settings.prefix)
    client.xadd(keys.outbox, {"e": b"{not json"})
    client.xadd(keys.outbox, {"other": b"field"})
    emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=2))

    with running(Shipper(shipper_settings(settings, fake))):
        wait_until(lambda: client.llen(keys.dead_letters) == 2 and settled(client, settings))

    assert len(fake.accepted_ids()) == 2
    assert [d["reason"] for d in dead_letter_records(client, keys)] == [
        "outbox entry is not a JSON object"
    ] * 2


def test_a_wrong_token_is_retried_never_dead_lettered_and_never_logged(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, caplog: pytest.LogCaptureFixture
) -> None:
    """401 is a configuration problem: events stay in the outbox, the ERROR line says what
    to check, and neither token appears in any log line."""
    keys = Keys(settings.prefix)
    emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=3))
    wrong = "dt0c01.WRONGTOKENVALUE.123456"
    caplog.set_level(logging.DEBUG)

    with running(shipper := Shipper(shipper_settings(settings, fake, dt_api_token=wrong))):
        wait_until(lambda: shipper.stats.requests >= 3)

    assert {r.status for r in fake.requests} == {401}
    assert client.llen(keys.dead_letters) == 0
    assert client.xlen(keys.outbox) == 3
    assert "HTTP 401" in caplog.text
    assert "bizevents.ingest scope" in caplog.text
    assert wrong not in caplog.text
    assert "WRONGTOKENVALUE" not in caplog.text
    assert TOKEN not in caplog.text


def test_events_keep_their_order_per_job_through_faults(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """Through retries and splits, each job's events arrive in the order they were written."""
    events = job_events(settings.prefix, jobs=5, per_job=40)
    emit_all(client, settings, events)
    fake.fail_next = [503, 429, 500]
    fake.retry_after = "0"
    fake.max_body_bytes = 20 * len(json.dumps(events[0]))

    with running(Shipper(shipper_settings(settings, fake, shipper_batch_size=50))):
        assert fake.wait_for(200)

    assert fake.duplicates() == {}
    with fake.lock:
        received = list(fake.accepted)
    assert order_by_subject(received) == order_by_subject(events)


def test_queue_transitions_are_shipped_with_their_join_fields(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """Events the queue's Lua scripts write (deferred, superseded, cancelled) reach the
    API with real join fields and stable ids."""
    queue = Queue(client, settings)
    jobs = [
        Job(
            type=JobType.INTEGRATION_TEST,
            repo="acme/lab-two",
            branch="feature/x",
            arch="arm64",
            commit="abcdef1",
            trigger="nightly",
        )
        for _ in range(3)
    ]
    for job in jobs:
        queue.enqueue(job)
    queue.cancel(jobs[0].id, "operator test")
    queue.cancel(jobs[2].id, "operator test")

    with running(Shipper(shipper_settings(settings, fake))):
        assert fake.wait_for(4)
        wait_until(lambda: settled(client, settings))

    with fake.lock:
        received = list(fake.accepted)
    assert [(e["type"], e["subject"]) for e in received] == [
        ("build.deferred", jobs[1].id),
        ("build.superseded", jobs[1].id),
        ("build.deferred", jobs[2].id),
        ("build.cancelled", jobs[0].id),
        ("build.cancelled", jobs[2].id),
    ]
    for event in received:
        data = event["data"]
        assert event["id"] == f"{event['subject']}.{event['type']}.0"
        assert event["source"] == f"orbital/{settings.prefix}"
        assert data["job.id"] == event["subject"]
        assert data["job.type"] == "integration-test"
        assert data["repository.name"] == "acme/lab-two"
        assert data["branch"] == "feature/x"
        assert data["arch"] == "arm64"
        assert data["commit_sha"] == "abcdef1"
        assert data["triggered_by"] == "nightly"
        assert data["attempt"] == 0
    assert received[1]["data"]["superseded_by"] == jobs[2].id
    assert received[0]["data"]["holder.job_id"] == jobs[0].id
    assert received[3]["data"]["reason"] == "operator test"


def test_a_standby_shipper_takes_over_when_the_sender_stops(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the lock holder sends; a second shipper stands by and takes over when the
    first stops, with nothing sent twice."""
    caplog.set_level(logging.INFO, "orbital.events")
    emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=5))
    first = Shipper(shipper_settings(settings, fake, shipper_name="first"))
    second = Shipper(shipper_settings(settings, fake, shipper_name="second"))
    first_thread = threading.Thread(target=first.run, daemon=True)
    first_thread.start()

    try:
        assert fake.wait_for(5)
        with running(second):
            wait_until(lambda: "shipper second: standing by" in caplog.text)
            emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=5, start=5))
            assert fake.wait_for(10)
            first.stop()
            first_thread.join(10)
            emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=5, start=10))
            assert fake.wait_for(15)
    finally:
        first.stop()
        first_thread.join(10)

    assert first.stats.delivered == 10
    assert second.stats.delivered == 5
    assert fake.duplicates() == {}
    assert len(fake.accepted_ids()) == 15


def test_dead_letters_can_be_replayed(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace
) -> None:
    """replay_dead_letters() puts refused events back in the outbox, and they ship."""
    keys = Keys(settings.prefix)
    events = job_events(settings.prefix, jobs=1, per_job=3)
    emit_all(client, settings, events)
    fake.poison_ids = {events[1]["id"]}

    with running(Shipper(shipper_settings(settings, fake))):
        wait_until(lambda: client.llen(keys.dead_letters) == 1)
        fake.poison_ids = set()
        assert replay_dead_letters(client, keys) == 1
        assert fake.wait_for(3)

    assert sorted(fake.accepted_ids()) == sorted(e["id"] for e in events)
    assert client.llen(keys.dead_letters) == 0


def test_a_deleted_outbox_is_recreated_and_shipping_goes_on(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, caplog: pytest.LogCaptureFixture
) -> None:
    """If someone deletes the outbox stream (and its group) the shipper recreates the
    group and ships what is written afterwards."""
    caplog.set_level(logging.WARNING, "orbital.events")
    emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=2))

    with running(Shipper(shipper_settings(settings, fake))):
        assert fake.wait_for(2)
        client.delete(Keys(settings.prefix).outbox)
        wait_until(lambda: "consumer group was deleted" in caplog.text)
        emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=3, start=2))
        assert fake.wait_for(5)

    assert fake.duplicates() == {}


def test_backoff_doubles_up_to_the_maximum_with_jitter(
    client: redis.Redis, settings: Settings, fake: FakeDynatrace, caplog: pytest.LogCaptureFixture
) -> None:
    """Without Retry-After the delay doubles from shipper_backoff_s up to the maximum,
    jittered between half and all of it (rng pinned to the top here)."""
    emit_all(client, settings, job_events(settings.prefix, jobs=1, per_job=1))
    fake.retry_after = ""
    fake.fail_next = [503] * 5
    caplog.set_level(logging.WARNING, "orbital.events")

    with running(Shipper(shipper_settings(settings, fake), rng=lambda: 1.0)):
        assert fake.wait_for(1)
    delays = re.findall(r"retry \d+ in ([0-9.]+) s \(backoff with jitter\)", caplog.text)

    assert delays == ["0.02", "0.04", "0.08", "0.16", "0.20"]
