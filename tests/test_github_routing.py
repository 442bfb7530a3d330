"""The routing table (default and from a file) and the planner that turns a delivery
into jobs, on the real payloads, without a server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from orbital.errors import ConfigError, WebhookRejectedError
from orbital.fleet import load_fleet
from orbital.github.delivery import Delivery
from orbital.github.planner import FleetSource, Plan, delivery_job_id, plan_delivery
from orbital.github.routing import (
    DEFAULT_TABLE,
    Facts,
    JobSpec,
    RoutingTable,
    load_routing_table,
    parse_routing_table,
)
from orbital.ids import validate_job_id
from orbital.settings import Settings
from tests.test_github_harness import payload, write_fleet

pytestmark = pytest.mark.shared

SETTINGS = Settings(secret_env=())


def plan(
    data: dict[str, Any],
    event: str,
    *,
    table: RoutingTable = DEFAULT_TABLE,
    fleet_path: Path | None = None,
    delivery_id: str = "d-1",
) -> Plan:
    fleet = load_fleet(fleet_path) if fleet_path else None
    return plan_delivery(Delivery(event, delivery_id, data), table, fleet, SETTINGS)


def actions(result: Plan) -> list[str]:
    return [str(p.job.params.get("action", p.job.type.value)) for p in result.jobs]


def test_default_table_routes_every_event_the_issue_names() -> None:
    """The built-in table holds the routes of the issue, and nothing for other events."""
    cases = [
        (Facts("issues", "opened", ("bug",)), ["agent fix-issue (once)"]),
        (Facts("issues", "labeled", ("BUG",)), ["agent fix-issue (once)"]),
        (Facts("issues", "labeled", ("gen3-migration",)), ["agent migrate (once)"]),
        (Facts("issues", "opened", ("new-enablement", "bug")),
         ["agent fix-issue (once)", "agent scaffold (once)"]),
        (Facts("issues", "opened", ()), []),
        (Facts("issues", "closed", ("bug",)), []),
        (Facts("pull_request", "opened"),
         ["agent review-pr (once)", "builds integration-test"]),
        (Facts("pull_request", "reopened"), ["builds integration-test"]),
        (Facts("pull_request", "synchronize"), ["builds integration-test"]),
        (Facts("pull_request", "closed"), []),
        (Facts("check_suite", "completed", conclusion="failure"), ["agent fix-ci (once)"]),
        (Facts("check_suite", "completed", conclusion="success"), []),
        (Facts("push", ref="refs/heads/main", default_branch="main"), ["sync validate"]),
        (Facts("push", ref="refs/heads/dev", default_branch="main"), []),
        (Facts("push", ref="refs/tags/main", default_branch="main"), []),
        (Facts("release", "published"), []),
    ]  # fmt: skip
    for facts, expected in cases:
        assert [s.describe() for s in DEFAULT_TABLE.jobs_for(facts)] == expected, facts


def test_unrelated_label_on_a_bug_issue_matches_no_rule(shared_dir: Path) -> None:
    """For a labeled action only the label just added counts, so labelling a bug issue
    "documentation" starts nothing."""
    data = payload(shared_dir, "issues.labeled.payload.json")
    data["label"]["name"] = "documentation"

    result = plan(data, "issues")

    assert result.jobs == []
    assert result.ignored == "no routing rule matches issues.labeled (labels documentation)"


def test_ignored_reason_shows_payload_text_without_control_characters(
    shared_dir: Path,
) -> None:
    """Label names are payload text: the reason (logged and returned) cuts them and
    replaces control characters, so a label cannot forge a log line."""
    data = payload(shared_dir, "issues.labeled.payload.json")
    data["label"]["name"] = "docs\nWARNING forged line" + "x" * 200

    reason = plan(data, "issues").ignored

    assert "\n" not in reason
    assert "docs?WARNING forged line" in reason
    assert len(reason) < 150


def test_routing_table_file_replaces_the_default(tmp_path: Path, shared_dir: Path) -> None:
    """A YAML routing file replaces the built-in table: here a PR starts only unit
    tests, and a bug issue a diagnose agent job."""
    path = tmp_path / "routing.yaml"
    path.write_text(
        "rules:\n"
        "  - event: pull_request\n"
        "    actions: opened\n"
        "    jobs: [{builds: unit-test}]\n"
        "  - event: issues\n"
        "    labels: [bug]\n"
        "    jobs: [{agent: diagnose, once: true}]\n"
    )
    table = load_routing_table(path)
    fleet = write_fleet(tmp_path / "repos.yaml")

    pr = plan(payload(shared_dir, "pull_request.opened.payload.json"), "pull_request",
              table=table, fleet_path=fleet)  # fmt: skip
    issue = plan(payload(shared_dir, "issues.opened.payload.json"), "issues", table=table)

    assert table.source == str(path)
    assert sorted((p.job.type.value, p.job.arch) for p in pr.jobs) == [
        ("unit-test", "amd64"),
        ("unit-test", "arm64"),
    ]
    assert actions(issue) == ["diagnose"]


def test_routing_table_in_json_is_accepted(tmp_path: Path) -> None:
    """JSON is accepted too (it is YAML)."""
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"rules": [{"event": "push", "jobs": [{"sync": "validate"}]}]}))

    assert load_routing_table(path).rules[0].jobs == (JobSpec("sync", "validate"),)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("nope", "top-level 'rules' list"),
        ([{"event": "star", "jobs": [{"agent": "x"}]}], r"rules\[0\], event: 'star'"),
        ([{"event": "push", "jobs": []}], "jobs: expected a non-empty list"),
        ([{"event": "push", "jobs": [{"sync": "validate"}], "label": "x"}],
         "unknown key.*label"),
        ([{"event": "issues", "jobs": [{"builds": "integration-test"}]}],
         "names no commit to build"),
        ([{"event": "push", "jobs": [{"builds": "daemon"}]}], "builds: expected one of"),
        ([{"event": "push", "jobs": [{"sync": "validate", "once": True}]}],
         "only on agent jobs"),
        ([{"event": "push", "jobs": [{"agent": "Fix It"}]}], "not a lower-case action"),
        ([{"event": "push", "jobs": [{"agent": "a", "sync": "b"}]}], "exactly one of"),
        ([{"event": "push", "actions": [1], "jobs": [{"sync": "v"}]}], "actions: expected"),
        ([{"event": "push", "default_branch": "yes", "jobs": [{"sync": "v"}]}],
         "default_branch: expected true or false"),
    ],
)  # fmt: skip
def test_invalid_routing_tables_name_the_rule_and_key(rules: Any, message: str) -> None:
    """Each mistake in a routing file is a ConfigError naming where it is."""
    with pytest.raises(ConfigError, match=message):
        parse_routing_table({"rules": rules} if rules != "nope" else {}, source="r.yaml")


def test_unreadable_routing_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing or non-YAML routing file is refused naming the file."""
    with pytest.raises(ConfigError, match="cannot read it"):
        load_routing_table(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_routing_table(bad)


def test_job_ids_are_stable_per_delivery_and_valid(shared_dir: Path, tmp_path: Path) -> None:
    """Planning the same delivery again names the same jobs (so a redelivery stores
    nothing twice); another delivery id names other jobs."""
    data = payload(shared_dir, "pull_request.opened.payload.json")
    fleet = write_fleet(tmp_path / "repos.yaml")

    first = [p.job.id for p in plan(data, "pull_request", fleet_path=fleet).jobs]
    again = [p.job.id for p in plan(data, "pull_request", fleet_path=fleet).jobs]
    other = [p.job.id for p in plan(data, "pull_request", fleet_path=fleet,
                                    delivery_id="d-2").jobs]  # fmt: skip

    assert first == again
    assert not set(first) & set(other)
    assert len(set(first)) == 3
    for job_id in first:
        validate_job_id(job_id)
    assert delivery_job_id("d-1", "x") != delivery_job_id("d-1", "y")


def test_check_suite_without_branch_or_pull_request(shared_dir: Path) -> None:
    """A failed suite with no PR still starts fix-ci (pr_number None); one with no
    head branch is ignored with the reason."""
    data = payload(shared_dir, "check_suite.completed.payload.json")
    data["check_suite"]["conclusion"] = "failure"
    data["check_suite"]["pull_requests"] = []

    (job,) = plan(data, "check_suite").jobs
    data["check_suite"]["head_branch"] = None
    ignored = plan(data, "check_suite")

    assert job.job.params["pr_number"] is None
    assert job.once_key == f"codertocat/hello-world:sha-{data['check_suite']['head_sha']}:fix-ci"
    assert ignored.jobs == []
    assert "has no head branch" in ignored.ignored


def test_push_that_deletes_the_default_branch_is_ignored(shared_dir: Path) -> None:
    """Deleting a branch is a push with no commit to validate: ignored with the reason."""
    data = payload(shared_dir, "push.payload.json")
    data.update(ref="refs/heads/master", deleted=True)

    result = plan(data, "push")

    assert result.jobs == []
    assert "deleted the branch" in result.ignored


def test_wrong_field_types_are_422_naming_the_field(shared_dir: Path) -> None:
    """A payload whose fields have the wrong JSON type is refused with 422, naming it."""
    data = payload(shared_dir, "issues.opened.payload.json")
    data["issue"]["number"] = "1; drop"

    with pytest.raises(WebhookRejectedError, match=r"field issue\.number") as caught:
        plan(data, "issues")
    assert caught.value.status == 422


def test_fleet_source_reloads_a_changed_registry_and_keeps_the_last_good_one(
    tmp_path: Path,
) -> None:
    """The receiver sees registry edits without a restart; a broken edit keeps the
    previous registry in use."""
    path = write_fleet(tmp_path / "repos.yaml")
    source = FleetSource(str(path))
    first = source.get()
    assert first is not None
    assert first.by_repo("Codertocat/amd-only") is not None

    write_fleet(path, [{"name": "only", "repo": "someone/only", "status": "active"}])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    second = source.get()
    assert second is not None
    assert [e.repo for e in second.entries] == ["someone/only"]

    path.write_text("repos: [ {name: broken\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
    assert source.get() is second
    assert FleetSource("").get() is None
