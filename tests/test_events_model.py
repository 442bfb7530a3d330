"""The CloudEvent model: Python-built events match the Lua-built ones, and the outbox writes."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
import redis
import redis.asyncio

from orbital.errors import ConfigError, EventError
from orbital.events import (
    BATCH_CONTENT_TYPE,
    IngestClient,
    aemit,
    cloud_event,
    emit,
    encode,
    heartbeat_event,
    job_event,
)
from orbital.events.batches import batch_body, chunk_end, per_event_errors
from orbital.events.outbox import OutboxEntry
from orbital.jobs import Job, JobType
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings
from orbital.workers.registration import Registration
from tests.dynatrace_fake import outbox_entries

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TOP_LEVEL = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"}


def outbox_events(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    return [json.loads(fields[b"e"]) for _id, fields in outbox_entries(client, keys)]


def lab_job(**overrides: Any) -> Job:
    fields: dict[str, Any] = {
        "type": JobType.INTEGRATION_TEST,
        "repo": "acme/lab-one",
        "branch": "main",
        "arch": "amd64",
        "commit": "0123abc",
        "trigger": "webhook",
    }
    fields.update(overrides)
    return Job(**fields)


def test_job_event_has_the_shape_of_the_lua_emitted_event(
    client: redis.Redis, settings: Settings
) -> None:
    """A Python job_event for the same job and type equals what the Lua emit() wrote,
    attribute for attribute and data key for data key."""
    keys = Keys(settings.prefix)
    queue = Queue(client, settings)
    holder, waiting = lab_job(), lab_job()
    queue.enqueue(holder)
    queue.enqueue(waiting)

    [lua_event] = outbox_events(client, keys)
    job = queue.get_job(waiting.id)
    python_event = job_event(
        settings.prefix, "build.deferred", job, {"holder.job_id": holder.id}, now=0.0
    )

    assert lua_event["type"] == "build.deferred"
    assert set(lua_event) == set(python_event) == TOP_LEVEL
    for name in TOP_LEVEL - {"time"}:
        assert python_event[name] == lua_event[name], name
    assert ISO_MS.match(lua_event["time"])
    assert ISO_MS.match(python_event["time"])
    assert lua_event["id"] == f"{waiting.id}.build.deferred.0"
    assert lua_event["data"]["repository.name"] == "acme/lab-one"
    assert lua_event["data"]["commit_sha"] == "0123abc"
    assert "worker_id" not in python_event["data"]  # no placeholder for a value not known yet


def test_cloud_event_round_trips_through_encode(client: redis.Redis, settings: Settings) -> None:
    """A generic event (sync.drift) is valid, compact JSON and keeps every attribute."""
    event = cloud_event(
        settings.prefix,
        "sync.drift",
        event_id="run-1.sync.drift.acme/lab-one",
        subject="acme/lab-one",
        data={"repository.name": "acme/lab-one", "drifted": True},
        now=1_700_000_000.5,
    )

    text = encode(event)

    assert json.loads(text) == event
    assert event["time"] == "2023-11-14T22:13:20.500Z"
    assert event["source"] == f"orbital/{settings.prefix}"
    assert " " not in text.replace("acme/lab-one", "")


def test_heartbeat_event_from_a_registration_mapping(settings: Settings) -> None:
    """worker.heartbeat carries the worker's identity and load, with a per-beat stable id."""
    registration = Registration(
        "w-amd64-1",
        "amd64",
        {"test:amd64": 2, "agent": 1},
        {"kind": "local", "isolation": "none"},
        status="ready",
        started_at=1000.0,
    )
    registration.active_jobs = {"j1": "test:amd64"}
    mapping = registration.to_mapping()

    event = heartbeat_event(mapping, prefix=settings.prefix)

    beat_ms = int(float(mapping["last_heartbeat"]) * 1000)
    assert event["id"] == f"w-amd64-1.worker.heartbeat.{beat_ms}"
    assert event["type"] == "worker.heartbeat"
    assert event["subject"] == "w-amd64-1"
    data = event["data"]
    assert data["worker_id"] == "w-amd64-1"
    assert data["arch"] == "amd64"
    assert data["capacity_total"] == 3
    assert data["active_jobs"] == 1
    assert data["queues"] == "agent,test:amd64"
    assert data["sandbox.kind"] == "local"
    assert data["uptime_s"] > 0
    assert data["orbital.version"]
    assert heartbeat_event(mapping, prefix=settings.prefix) == event  # same beat, same event
    encode(event)


def test_heartbeat_event_needs_id_and_beat_time(settings: Settings) -> None:
    """A registration without id or last_heartbeat is refused with the keys it had."""
    with pytest.raises(EventError, match="needs 'id' and 'last_heartbeat'"):
        heartbeat_event({"arch": "amd64"}, prefix=settings.prefix)


def test_emit_appends_one_entry_with_the_event_in_field_e(
    client: redis.Redis, settings: Settings
) -> None:
    """emit() writes one stream entry whose only field, e, is the event JSON."""
    keys = Keys(settings.prefix)
    job = lab_job(worker="w1", attempts=2)
    event = job_event(
        settings.prefix, "agent.fix-issue", job, {"success": True}, now=5.0, suffix=".x"
    )

    entry_id = emit(client, keys, event)

    [(stored_id, fields)] = outbox_entries(client, keys)
    assert stored_id.decode() == entry_id
    assert list(fields) == [b"e"]
    assert json.loads(fields[b"e"]) == event
    assert event["id"] == f"{job.id}.agent.fix-issue.2.x"
    assert event["data"]["attempt"] == 2
    assert event["data"]["worker_id"] == "w1"


def test_aemit_appends_like_emit(
    redis_server: Any, client: redis.Redis, settings: Settings
) -> None:
    """The asyncio twin writes the same entry."""
    keys = Keys(settings.prefix)
    event = cloud_event(settings.prefix, "sync.drift", event_id="d1", subject="s", data={}, now=1.0)

    async def main() -> str:
        aclient = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return await aemit(aclient, keys, event)
        finally:
            await aclient.aclose()

    entry_id = asyncio.run(main())

    [(stored_id, fields)] = outbox_entries(client, keys)
    assert stored_id.decode() == entry_id
    assert json.loads(fields[b"e"]) == event


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": ""}, "'type' must be a non-empty string"),
        ({"id": None}, "'id' must be a non-empty string"),
        ({"specversion": "0.3"}, "specversion must be '1.0'"),
        ({"data": [1, 2]}, "data must be a JSON object"),
        ({"data": {"x": float("nan")}}, "not JSON-serialisable"),
    ],
)
def test_encode_refuses_what_the_ingest_api_would_refuse(
    client: redis.Redis, settings: Settings, change: dict[str, Any], message: str
) -> None:
    """An event missing a required attribute never reaches the outbox."""
    event = cloud_event(settings.prefix, "sync.drift", event_id="d1", subject="s", data={}, now=1.0)
    event.update(change)

    with pytest.raises(EventError, match=re.escape(message)):
        emit(client, Keys(settings.prefix), event)

    assert client.xlen(Keys(settings.prefix).outbox) == 0


def test_the_dynatrace_token_is_a_secret_and_stays_out_of_repr() -> None:
    """secret_values() includes dt_api_token, and repr(settings) never shows it."""
    settings = Settings.from_env({"ORBITAL_DT_API_TOKEN": "dt0c01.SECRETTOKENVALUE"}, secret_env=())

    assert "dt0c01.SECRETTOKENVALUE" in settings.secret_values({})
    assert "SECRETTOKENVALUE" not in repr(settings)


@pytest.mark.parametrize(
    ("environment", "token", "message"),
    [
        ("", "t0k3n", "ORBITAL_DT_ENVIRONMENT"),
        ("ftp://abc.live.dynatrace.com", "t0k3n", "expected an http(s) URL"),
        ("https://abc.live.dynatrace.com?x=1", "t0k3n", "must not carry a query"),
        ("https://abc.live.dynatrace.com", "", "ORBITAL_DT_API_TOKEN"),
    ],
)
def test_ingest_client_refuses_unusable_configuration(
    environment: str, token: str, message: str
) -> None:
    """A bad environment URL or an empty token is a ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        IngestClient(environment, token, 5.0)


def test_ingest_client_builds_the_documented_url_and_hides_the_token() -> None:
    """The URL is {environment}/api/v2/bizevents/ingest (ActiveGate paths kept) and
    repr shows no token."""
    saas = IngestClient("https://abc12345.live.dynatrace.com/", "dt0c01.TOKEN", 5.0)
    activegate = IngestClient("https://ag.example:9999/e/abc12345", "dt0c01.TOKEN", 5.0)

    assert saas.url == "https://abc12345.live.dynatrace.com/api/v2/bizevents/ingest"
    assert activegate.url == "https://ag.example:9999/e/abc12345/api/v2/bizevents/ingest"
    assert "TOKEN" not in repr(saas)
    assert BATCH_CONTENT_TYPE == "application/cloudevents-batch+json"


def entries_of(*raws: bytes) -> list[OutboxEntry]:
    return [OutboxEntry(f"{i}-0", raw) for i, raw in enumerate(raws)]


def test_chunks_fit_the_byte_limit_and_an_oversize_event_travels_alone() -> None:
    """chunk_end() packs consecutive entries up to the body limit, never splitting order."""
    chunk = entries_of(b'{"id":"a"}', b'{"id":"b"}', b"{" + b"x" * 50 + b"}", b'{"id":"c"}')

    assert batch_body(chunk[:2]) == b'[{"id":"a"},{"id":"b"}]'
    assert chunk_end(chunk, 0, len(batch_body(chunk[:2]))) == 2
    assert chunk_end(chunk, 2, 30) == 3  # larger than the limit: alone
    assert chunk_end(chunk, 3, 1000) == 4


def test_per_event_errors_use_the_index_or_else_the_event_id() -> None:
    """A 400 body maps to positions by index, by id when the index is unusable, and to
    nothing when it carries no per-event detail."""
    chunk = entries_of(b'{"id":"a"}', b'{"id":"b"}', b'{"id":"c"}')
    body = json.dumps(
        {"errors": [{"index": 2, "message": "bad time"}, {"id": "a", "index": 9, "message": "x"}]}
    ).encode()

    assert per_event_errors(body, chunk) == {2: "bad time", 0: "x"}
    assert per_event_errors(b'{"error": {"code": 400}}', chunk) == {}
    assert per_event_errors(b"not json", chunk) == {}
    assert per_event_errors(b'{"errors": [{"id": "zzz"}]}', chunk) == {}
