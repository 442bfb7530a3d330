"""The webhook receiver end to end: real GitHub payloads from ../shared/webhooks,
signed here, posted to a receiver listening on 127.0.0.1, and the jobs it enqueued
read back from the real Redis."""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from orbital.errors import ConfigError
from orbital.github.app import WebhookService
from orbital.github.delivery import Delivery
from orbital.github.intake import PENDING_CLAIM_MS, Intake
from orbital.github.planner import FleetSource
from orbital.github.routing import DEFAULT_TABLE
from orbital.jobs import Job
from orbital.queue import EnqueueResult
from orbital.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.test_github_harness import (
    FORM,
    Receiver,
    active_jobs,
    edited,
    job_summary,
    payload,
    raw_payload,
    receiver_settings,
    write_fleet,
)

pytestmark = pytest.mark.shared

HEAD_SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
REPO = "Codertocat/Hello-World"


@pytest.fixture
def receiver(settings: Settings, tmp_path: Path) -> Iterator[Receiver]:
    """A receiver on a free loopback port with the test fleet registry."""
    fleet = write_fleet(tmp_path / "repos.yaml")
    service = Receiver(receiver_settings(settings, free_port(), fleet_file=str(fleet)))
    yield service.start()
    service.stop()


def test_ping_answers_pong_and_enqueues_nothing(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A repository hook's ping is answered 200 pong."""
    status, body = receiver.post(raw_payload(shared_dir, "ping.payload.json"), "ping")

    assert (status, body) == (200, {"status": "pong"})
    assert active_jobs(client, receiver.settings) == []


def test_organisation_and_app_pings_without_repository_answer_pong(
    receiver: Receiver, shared_dir: Path
) -> None:
    """Pings of organisation and app hooks carry no repository and still get pong."""
    ping = payload(shared_dir, "ping.payload.json")

    def org(data: dict[str, Any]) -> None:
        data.pop("repository")
        data["hook"]["type"] = "Organization"
        data["organization"] = {"login": "Octocoders", "id": 38302899}

    def app(data: dict[str, Any]) -> None:
        data.pop("repository")
        data["hook"] = {"type": "App", "id": 1, "app_id": 42, "active": True}

    assert receiver.post(edited(ping, org), "ping") == (200, {"status": "pong"})
    assert receiver.post(edited(ping, app), "ping") == (200, {"status": "pong"})


def test_bug_issue_opened_enqueues_one_fix_issue_agent_job(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """An issue opened with the bug label starts a fix-issue agent job with its text."""
    started = time.monotonic()
    status, body = receiver.post(raw_payload(shared_dir, "issues.opened.payload.json"), "issues")
    elapsed = time.monotonic() - started

    assert status == 202
    assert body["status"] == "accepted"
    assert elapsed < 1.0
    (job,) = active_jobs(client, receiver.settings)
    assert job_summary([job]) == [("agent", "fix-issue", REPO, "master", "", "")]
    assert job.id == body["jobs"][0]["id"]
    assert job.trigger == "issues"
    assert job.queue == "agent"
    assert job.params["issue_number"] == 1
    assert job.params["issue_title"] == "Spelling error in the README file"
    assert job.params["labels"] == ["bug"]
    assert job.params["event"] == "issues.opened"


def test_bug_issue_gets_one_fix_issue_job_whatever_labels_follow(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """Opened with bug, then labeled bug again: still exactly one fix-issue job."""
    receiver.post(raw_payload(shared_dir, "issues.opened.payload.json"), "issues")
    status, body = receiver.post(raw_payload(shared_dir, "issues.labeled.payload.json"), "issues")

    assert status == 202
    assert body["jobs"] == []
    assert "already started once" in body["notes"][0]
    assert len(active_jobs(client, receiver.settings)) == 1


def test_issue_labeled_bug_first_starts_the_fix_issue_job(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A bug label added later starts the fix-issue job when opening did not."""
    opened = payload(shared_dir, "issues.opened.payload.json")
    status, body = receiver.post(edited(opened, _clear_labels), "issues")
    assert status == 202
    assert body["status"] == "ignored"
    assert "issues.opened" in body["reason"]

    receiver.post(raw_payload(shared_dir, "issues.labeled.payload.json"), "issues")

    jobs = active_jobs(client, receiver.settings)
    assert job_summary(jobs) == [("agent", "fix-issue", REPO, "master", "", "")]
    assert jobs[0].params["event"] == "issues.labeled"


@pytest.mark.parametrize(
    ("label", "action"), [("gen3-migration", "migrate"), ("new-enablement", "scaffold")]
)
def test_migration_and_enablement_labels_start_their_agent_jobs(
    receiver: Receiver, shared_dir: Path, client: redis.Redis, label: str, action: str
) -> None:
    """The gen3-migration and new-enablement labels map to migrate and scaffold jobs."""
    labeled = payload(shared_dir, "issues.labeled.payload.json")

    def relabel(data: dict[str, Any]) -> None:
        data["label"]["name"] = label
        data["issue"]["labels"] = [{"name": label}]

    status, _ = receiver.post(edited(labeled, relabel), "issues")

    assert status == 202
    assert job_summary(active_jobs(client, receiver.settings)) == [
        ("agent", action, REPO, "master", "", "")
    ]


def test_pull_request_opened_starts_review_and_builds_on_registry_arches(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A new PR starts a review-pr agent job and one integration test per registry arch,
    on the PR's head branch and commit."""
    status, body = receiver.post(
        raw_payload(shared_dir, "pull_request.opened.payload.json"), "pull_request"
    )

    assert status == 202
    assert len(body["jobs"]) == 3
    jobs = active_jobs(client, receiver.settings)
    assert job_summary(jobs) == [
        ("agent", "review-pr", REPO, "changes", HEAD_SHA, ""),
        ("integration-test", "", REPO, "changes", HEAD_SHA, "amd64"),
        ("integration-test", "", REPO, "changes", HEAD_SHA, "arm64"),
    ]
    builds = [j for j in jobs if j.type.is_lab]
    assert {j.trigger for j in builds} == {"pull_request"}
    assert {j.queue for j in builds} == {"test:amd64", "test:arm64"}
    review = next(j for j in jobs if not j.type.is_lab)
    assert review.params["pr_number"] == 2
    assert review.params["fork"] is False


def test_pull_request_synchronize_builds_again_without_a_new_review(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """New commits on a PR (synchronize) start builds only."""
    pr = payload(shared_dir, "pull_request.opened.payload.json")

    def sync(data: dict[str, Any]) -> None:
        data["action"] = "synchronize"

    receiver.post(edited(pr, sync), "pull_request")

    assert [j.type.value for j in active_jobs(client, receiver.settings)] == [
        "integration-test",
        "integration-test",
    ]


def test_pull_request_from_a_fork_builds_the_fork_head(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A fork's PR is built from the fork and branch, on the base repository's arches;
    the review job stays on the base repository."""
    pr = payload(shared_dir, "pull_request.opened.payload.json")

    def fork(data: dict[str, Any]) -> None:
        head = data["pull_request"]["head"]
        head["ref"] = "fix/typo"
        head["repo"]["full_name"] = "forker/Hello-World"

    receiver.post(edited(pr, fork), "pull_request")

    jobs = active_jobs(client, receiver.settings)
    assert job_summary(jobs) == [
        ("agent", "review-pr", REPO, "master", "", ""),
        ("integration-test", "", "forker/Hello-World", "fix/typo", HEAD_SHA, "amd64"),
        ("integration-test", "", "forker/Hello-World", "fix/typo", HEAD_SHA, "arm64"),
    ]
    review = next(j for j in jobs if not j.type.is_lab)
    assert review.params["fork"] is True
    assert review.params["head_repo"] == "forker/Hello-World"


@pytest.mark.parametrize(
    ("base_repo", "arches", "note"),
    [
        ("Codertocat/amd-only", ["amd64"], ""),
        ("Codertocat/no-ci", [], "ci: false"),
        ("Codertocat/old-lab", [], "archived"),
        ("Codertocat/not-listed", [], "not in the fleet registry"),
    ],
)
def test_pull_request_builds_follow_the_registry_entry(
    receiver: Receiver,
    shared_dir: Path,
    client: redis.Redis,
    base_repo: str,
    arches: list[str],
    note: str,
) -> None:
    """Builds run on the registry's arches for the base repository, and none for a
    repository that is not listed, has ci: false or is archived."""
    pr = payload(shared_dir, "pull_request.opened.payload.json")

    def rebase(data: dict[str, Any]) -> None:
        data["repository"]["full_name"] = base_repo
        data["pull_request"]["base"]["repo"]["full_name"] = base_repo
        data["pull_request"]["head"]["repo"]["full_name"] = base_repo

    status, body = receiver.post(edited(pr, rebase), "pull_request")

    assert status == 202
    jobs = active_jobs(client, receiver.settings)
    assert sorted(j.arch for j in jobs if j.type.is_lab) == arches
    assert [j.params["action"] for j in jobs if not j.type.is_lab] == ["review-pr"]
    if note:
        assert any(note in n for n in body["notes"])


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("pull_request.head.ref", lambda d: d["pull_request"]["head"].update(ref="x;rm -rf ~")),
        ("pull_request.head.ref", lambda d: d["pull_request"]["head"].update(ref="$(id)")),
        ("pull_request.head.sha", lambda d: d["pull_request"]["head"].update(sha="abc; ls")),
        ("pull_request.head.repo.full_name",
         lambda d: d["pull_request"]["head"]["repo"].update(full_name="a/b c")),
        ("pull_request.base.repo.full_name",
         lambda d: d["pull_request"]["base"]["repo"].update(full_name="../../etc")),
    ],
)  # fmt: skip
def test_invalid_identifier_is_refused_naming_the_field_and_nothing_is_enqueued(
    receiver: Receiver, shared_dir: Path, client: redis.Redis, field: str, change: Any
) -> None:
    """A branch, sha or repository with shell or path characters gets 422 naming the
    payload field; no job is stored and the delivery id is not used up."""
    pr = payload(shared_dir, "pull_request.opened.payload.json")

    status, body = receiver.post(edited(pr, change), "pull_request", delivery="bad-1")

    assert status == 422
    assert body["status"] == "rejected"
    assert body["reason"].startswith(f"field {field}:")
    assert active_jobs(client, receiver.settings) == []
    status, _ = receiver.post(
        raw_payload(shared_dir, "pull_request.opened.payload.json"), "pull_request",
        delivery="bad-1",
    )  # fmt: skip
    assert status == 202


def test_failed_check_suite_starts_fix_ci_with_pr_branch_and_sha(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A check suite that completed with failure starts a fix-ci agent job carrying the
    PR number, branch and head sha."""
    suite = payload(shared_dir, "check_suite.completed.payload.json")

    def fail(data: dict[str, Any]) -> None:
        data["check_suite"]["conclusion"] = "failure"

    status, _ = receiver.post(edited(suite, fail), "check_suite")

    assert status == 202
    (job,) = active_jobs(client, receiver.settings)
    assert job_summary([job]) == [("agent", "fix-ci", REPO, "changes", HEAD_SHA, "")]
    assert job.params["pr_number"] == 2
    assert job.params["head_branch"] == "changes"
    assert job.params["head_sha"] == HEAD_SHA
    assert job.params["conclusion"] == "failure"


def test_successful_check_suite_is_accepted_and_ignored(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """The real check_suite payload (conclusion success) starts nothing."""
    status, body = receiver.post(
        raw_payload(shared_dir, "check_suite.completed.payload.json"), "check_suite"
    )

    assert (status, body["status"]) == (202, "ignored")
    assert "conclusion success" in body["reason"]
    assert active_jobs(client, receiver.settings) == []


def test_push_to_default_branch_starts_sync_validation(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A push to the repository's default branch starts a sync validation job."""
    push = payload(shared_dir, "push.payload.json")

    def to_master(data: dict[str, Any]) -> None:
        data.update(ref="refs/heads/master", after=HEAD_SHA, deleted=False, created=False)

    status, _ = receiver.post(edited(push, to_master), "push")

    assert status == 202
    (job,) = active_jobs(client, receiver.settings)
    assert job_summary([job]) == [("sync", "validate", REPO, "master", HEAD_SHA, "")]
    assert job.queue == "sync"
    assert job.params["ref"] == "refs/heads/master"


def test_push_of_a_tag_or_another_branch_is_ignored(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """The real push payload (a tag) and a push to a feature branch start nothing."""
    push = payload(shared_dir, "push.payload.json")

    def to_feature(data: dict[str, Any]) -> None:
        data.update(ref="refs/heads/feature", after=HEAD_SHA)

    for body in (raw_payload(shared_dir, "push.payload.json"), edited(push, to_feature)):
        status, answer = receiver.post(body, "push")
        assert (status, answer["status"]) == (202, "ignored")
    assert active_jobs(client, receiver.settings) == []


def test_unrouted_event_is_accepted_ignored_and_the_reason_logged(
    receiver: Receiver, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An event no rule names is answered 202 and the reason is logged."""
    caplog.set_level(logging.INFO, logger="orbital.github")

    status, body = receiver.post(b'{"action": "created", "starred_at": null}', "star")

    assert (status, body["status"]) == (202, "ignored")
    assert body["reason"] == "no routing rule matches star.created"
    assert any("ignored: no routing rule matches star.created" in m for m in caplog.messages)
    assert active_jobs(client, receiver.settings) == []


def test_repeated_delivery_id_is_ignored_also_after_a_restart(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """A delivery id already accepted is answered 200 duplicate, by this receiver and
    by a new one (the record is in Redis), and enqueues nothing more."""
    body = raw_payload(shared_dir, "pull_request.opened.payload.json")
    assert receiver.post(body, "pull_request", delivery="d-1")[0] == 202

    assert receiver.post(body, "pull_request", delivery="d-1") == (
        200, {"status": "duplicate delivery"},
    )  # fmt: skip
    receiver.stop()
    second = Receiver(dataclasses.replace(receiver.settings, webhook_port=free_port())).start()
    try:
        assert second.post(body, "pull_request", delivery="d-1")[0] == 200
    finally:
        second.stop()
    assert len(active_jobs(client, receiver.settings)) == 3


def test_form_encoded_delivery_is_verified_over_the_raw_form_body(
    receiver: Receiver, shared_dir: Path, client: redis.Redis
) -> None:
    """GitHub's form content type (payload=<JSON>) is verified and routed like JSON."""
    document = raw_payload(shared_dir, "pull_request.opened.payload.json").decode()
    form = urllib.parse.urlencode({"payload": document}).encode()

    status, body = receiver.post(form, "pull_request", content_type=FORM)

    assert status == 202
    assert len(body["jobs"]) == 3
    assert len(active_jobs(client, receiver.settings)) == 3


def test_health_endpoint_reports_only_ok(receiver: Receiver) -> None:
    """/healthz answers {"status": "ok"} and nothing about jobs or configuration."""
    status, body = receiver.request("GET", "/healthz")

    assert (status, body) == (200, {"status": "ok"})


def test_receiver_refuses_to_start_without_a_secret(settings: Settings) -> None:
    """No webhook secret (or only blanks): the service is refused with a ConfigError."""
    for secret in ("", "   "):
        with pytest.raises(ConfigError, match="ORBITAL_WEBHOOK_SECRET"):
            WebhookService(dataclasses.replace(settings, webhook_secret=secret))


def test_redis_outage_answers_503_and_the_redelivery_is_handled(
    settings: Settings, shared_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """With Redis down a delivery is answered 503 quickly and not marked accepted; the
    same delivery id is handled once Redis is back."""
    private = RedisServer(redis_server.executable, tmp_path)
    private.start()
    fleet = write_fleet(tmp_path / "repos.yaml")
    own = receiver_settings(settings, free_port(), fleet_file=str(fleet), redis_url=private.url)
    service = Receiver(own).start()
    body = raw_payload(shared_dir, "pull_request.opened.payload.json")
    try:
        private.stop()
        started = time.monotonic()
        status, answer = service.post(body, "pull_request", delivery="outage-1")
        assert (status, answer["status"]) == (503, "unavailable")
        assert time.monotonic() - started < 3.0
        assert service.request("GET", "/healthz")[0] == 503

        private.start()
        status, answer = service.post(body, "pull_request", delivery="outage-1")
        assert status == 202
        assert len(answer["jobs"]) == 3
    finally:
        service.stop()
        private.stop()


def _clear_labels(data: dict[str, Any]) -> None:
    data["issue"]["labels"] = []


def _ttl(client: redis.Redis, key: str) -> int:
    return cast(int, client.ttl(key))


def _pttl(client: redis.Redis, key: str) -> int:
    return cast(int, client.pttl(key))


def _intake(settings: Settings, client: redis.Redis) -> Intake:
    return Intake(client, receiver_settings(settings, 1), DEFAULT_TABLE, FleetSource(""))


def _delivery(shared_dir: Path, name: str, delivery_id: str) -> Delivery:
    return Delivery(name.split(".")[0], delivery_id, payload(shared_dir, name))


def test_failure_half_way_releases_the_claims_so_the_issue_is_not_lost(
    settings: Settings, shared_dir: Path, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing between the "once" claim and the enqueue (an injected fault)
    leaves neither the delivery nor the issue claimed: the redelivery, or the next
    bug label, starts the job."""
    intake = _intake(settings, client)
    real_enqueue = intake.queue.enqueue

    def broken(job: Job, **kwargs: Any) -> EnqueueResult:
        raise redis.ConnectionError("injected: Redis went away")

    monkeypatch.setattr(intake.queue, "enqueue", broken)
    with pytest.raises(redis.ConnectionError):
        intake.handle(_delivery(shared_dir, "issues.opened.payload.json", "opened-1"))

    assert client.keys(f"{settings.prefix}:github:*") == []
    monkeypatch.setattr(intake.queue, "enqueue", real_enqueue)
    outcome = intake.handle(_delivery(shared_dir, "issues.labeled.payload.json", "labeled-1"))
    assert outcome.status == 202
    assert len(outcome.job_ids) == 1
    ttl = _ttl(client, intake.once_key("codertocat/hello-world:issue-1:fix-issue"))
    assert ttl > settings.webhook_once_ttl_s - 60


def test_claims_that_cannot_be_released_expire_within_a_minute(
    settings: Settings, shared_dir: Path, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even the release fails (injected), the claims carry only the short pending
    TTL; a retry of the same delivery id after that goes through and stores each job
    once."""
    intake = _intake(settings, client)
    real_enqueue = intake.queue.enqueue

    def broken(job: Job, **kwargs: Any) -> EnqueueResult:
        raise redis.ConnectionError("injected")

    def no_release(**kwargs: Any) -> None:
        raise redis.ConnectionError("injected")

    monkeypatch.setattr(intake.queue, "enqueue", broken)
    monkeypatch.setattr(intake, "_release", no_release)
    with pytest.raises(redis.ConnectionError):
        intake.handle(_delivery(shared_dir, "issues.opened.payload.json", "opened-2"))

    once = intake.once_key("codertocat/hello-world:issue-1:fix-issue")
    assert 0 < _pttl(client, intake.delivery_key("opened-2")) <= PENDING_CLAIM_MS
    assert 0 < _pttl(client, once) <= PENDING_CLAIM_MS
    client.delete(intake.delivery_key("opened-2"))  # as if the pending claim had expired

    monkeypatch.setattr(intake.queue, "enqueue", real_enqueue)
    first = intake.handle(_delivery(shared_dir, "issues.opened.payload.json", "opened-2"))
    assert len(first.job_ids) == 1
    assert _ttl(client, once) > settings.webhook_once_ttl_s - 60
    assert len(active_jobs(client, intake.settings)) == 1
