"""Tests for the fleet registry: the real repos.yaml, variants of it, and bad input."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orbital.errors import FleetError
from orbital.fleet import (
    MAX_FLEET_BYTES,
    STATUSES,
    Fleet,
    RepoEntry,
    load_fleet,
    parse_duration,
    parse_fleet,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "fleet" / "repos.yaml"
requires_real = pytest.mark.skipif(
    not REAL.is_file(), reason=f"{REAL} is absent: the ../shared checkout is needed"
)

GOOD = {"name": "lab-one", "repo": "acme/lab-one", "status": "active", "tags": ["k8s"]}
ARCH_BOTH = ("arm64", "amd64")
DROP = "<drop this key>"


def write_fleet(tmp_path: Path, entries: Any, name: str = "repos.yaml") -> Path:
    """Write ``{"repos": entries}`` as YAML into tmp_path and return the file."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"repos": entries}, sort_keys=False), encoding="utf-8")
    return path


def fleet_error(path: Path) -> str:
    """Load ``path``, expect a FleetError naming the file, and return its message."""
    with pytest.raises(FleetError) as caught:
        load_fleet(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    return message


def entry_error(tmp_path: Path, **changes: Any) -> str:
    """Return the error for a fleet of GOOD plus one entry (index 1) with ``changes``;
    a change to DROP removes that key."""
    bad = {**GOOD, "name": "lab-two", "repo": "acme/lab-two", **changes}
    return fleet_error(write_fleet(tmp_path, [GOOD, {k: v for k, v in bad.items() if v != DROP}]))


# ── parse_duration ──────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20m", 1200), ("1.5h", 5400), ("30min", 1800), ("2h", 7200), ("90s", 90), ("2.5 h", 9000)],
)
def test_parse_duration_accepts_registry_forms(text: str, seconds: float) -> None:
    """The duration forms used by the registry parse to the right number of seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "20", "h", "-2h", "2d", "0m", "1e3s", "2 hours", "1.h"])
def test_parse_duration_refuses_other_text(text: str) -> None:
    """Anything but a positive number and a known unit is refused, naming the value."""
    with pytest.raises(ValueError, match="invalid duration") as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)


# ── the real registry ───────────────────────────────────────────────────────


def real_fleet() -> Fleet:
    """Load the real registry from ../shared."""
    return load_fleet(REAL)


@pytest.mark.shared
@requires_real
def test_real_registry_counts() -> None:
    """The real file has 30 entries, 28 active, 25 eligible and 47 nightly jobs (22 x 2 + 3)."""
    fleet = real_fleet()
    fanout = fleet.nightly_fanout()

    assert fleet.path == str(REAL)
    assert len(fleet.entries) == 30
    assert sum(entry.status == "active" for entry in fleet.entries) == 28
    assert len(fleet.eligible()) == 25
    assert len(fanout) == 47
    assert sum(entry.arches == ("arm64", "amd64") for entry in fleet.eligible()) == 22
    assert [e.name for e in fleet.eligible() if e.arches == ("amd64",)] == [
        "enablement-business-observability",
        "enablement-dynatrace-log-ingest-101",
        "workshop-dynatrace-log-analytics",
    ]
    assert [arch for _, arch in fanout].count("amd64") == 25


@pytest.mark.shared
@requires_real
def test_real_registry_entries_round_trip_exactly() -> None:
    """to_dict() of every real entry equals the mapping as written in the file."""
    raw = yaml.safe_load(REAL.read_text(encoding="utf-8"))["repos"]
    fleet = real_fleet()

    assert [entry.to_dict() for entry in fleet.entries] == raw
    again = parse_fleet(yaml.safe_dump({"repos": raw}), source="again.yaml")
    assert again.entries == fleet.entries


@pytest.mark.shared
@requires_real
def test_real_registry_fields_and_extras() -> None:
    """Interpreted fields are typed and unknown keys land in extra, unchanged."""
    fleet = real_fleet()
    mcp = fleet.by_name("enablement-dynatrace-ai-mcp")
    template = fleet.by_name("enablement-app-training-template")
    site = fleet.by_name("dynatrace-wwse.github.io")
    archived = fleet.by_name("ace-integration")

    assert mcp is not None
    assert template is not None
    assert site is not None
    assert archived is not None
    assert mcp.tags == ("gen-ai", "opentelemetry", "mcp")
    assert mcp.duration_s == 7200
    assert mcp.branch == "main"
    assert mcp.ci is True
    assert mcp.extra["image_tier"] == "minimal"
    assert mcp.extra["title"] == "AI Observability & MCP"
    assert template.duration_s == 1800
    assert template.extra["is_template"] is True
    assert site.ci is False
    assert not site.nightly_eligible
    assert site.duration_s is None
    assert site.extra["sync_managed"] is False
    assert site.extra["listed"] is False
    assert archived.status == "archived"
    assert not archived.nightly_eligible
    assert archived.extra["listed"] is False
    assert set(fleet.entries[6].extra) == {
        "maintainer",
        "description",
        "title",
        "primary_tag",
        "icon_key",
    }


@pytest.mark.shared
@requires_real
def test_real_registry_lookups() -> None:
    """by_repo ignores letter case; by_name is exact; unknown names give None."""
    fleet = real_fleet()

    entry = fleet.by_repo("Dynatrace-WWSE/Bug-Busters")
    assert entry is not None
    assert entry.name == "bug-busters"
    assert fleet.by_repo("dynatrace-wwse/nope") is None
    assert fleet.by_name("Bug-Busters") is None
    assert fleet.by_name("bug-busters") is entry


@pytest.mark.shared
@requires_real
def test_real_registry_loads_fast_and_logs_counts(caplog: pytest.LogCaptureFixture) -> None:
    """Loading the real file takes well under half a second and logs one line with the counts."""
    caplog.set_level(logging.INFO, logger="orbital.fleet")
    started = time.perf_counter()
    real_fleet()
    elapsed = time.perf_counter() - started

    assert elapsed < 0.5
    assert [r.getMessage() for r in caplog.records] == [
        f"fleet registry {REAL} loaded: 30 entries, 25 run nightly as 47 jobs"
    ]


@pytest.mark.shared
@requires_real
def test_real_registry_copy_with_one_broken_entry(tmp_path: Path) -> None:
    """A copy of the real file with one entry's arch broken names that entry and field."""
    copy = tmp_path / "repos.yaml"
    shutil.copy(REAL, copy)
    text = copy.read_text(encoding="utf-8")
    copy.write_text(text.replace("arch: amd64", "arch: x86_64", 1), encoding="utf-8")

    message = fleet_error(copy)
    assert "1 problem(s)" in message
    assert "repos[5] (name 'enablement-business-observability'), field 'arch'" in message
    assert "unknown arch 'x86_64': expected one of arm64, amd64" in message


# ── variants ────────────────────────────────────────────────────────────────


def test_arch_forms_and_fanout_order() -> None:
    """arch may be absent, a string or a list; fan-out is file order then arm64, amd64."""
    fleet = parse_fleet(
        yaml.safe_dump(
            {
                "repos": [
                    {**GOOD, "name": "a", "repo": "o/a", "arch": ["amd64", "arm64"]},
                    {**GOOD, "name": "b", "repo": "o/b", "arch": "arm64"},
                    {**GOOD, "name": "c", "repo": "o/c"},
                    {**GOOD, "name": "d", "repo": "o/d", "ci": False},
                    {**GOOD, "name": "e", "repo": "o/e", "status": "wip"},
                ]
            }
        )
    )

    assert fleet.path == "<string>"
    assert [(e.name, arch) for e, arch in fleet.nightly_fanout()] == [
        ("a", "arm64"),
        ("a", "amd64"),
        ("b", "arm64"),
        ("c", "arm64"),
        ("c", "amd64"),
    ]
    assert [e.arches for e in fleet.entries[:3]] == [("arm64", "amd64"), ("arm64",), ARCH_BOTH]


def test_branch_default_and_custom_round_trip() -> None:
    """branch defaults to main; a custom branch is kept and written back by to_dict."""
    fleet = parse_fleet(
        yaml.safe_dump(
            {"repos": [GOOD, {**GOOD, "name": "b", "repo": "o/b", "branch": "release/2.x"}]}
        )
    )

    assert [e.branch for e in fleet.entries] == ["main", "release/2.x"]
    assert fleet.entries[1].to_dict()["branch"] == "release/2.x"
    assert "branch" not in fleet.entries[0].to_dict()


def test_extra_keys_are_kept_read_only_and_copied_out() -> None:
    """Unknown keys keep their values; extra cannot be changed and to_dict returns a copy."""
    fleet = parse_fleet(
        yaml.safe_dump({"repos": [{**GOOD, "owners": ["a", "b"], "new_key": {"x": 1}}]})
    )
    entry = fleet.entries[0]

    assert dict(entry.extra) == {"owners": ["a", "b"], "new_key": {"x": 1}}
    with pytest.raises(TypeError):
        entry.extra["owners"] = []  # type: ignore[index]
    entry.to_dict()["owners"].append("c")
    assert entry.extra["owners"] == ["a", "b"]
    assert hash(entry) == hash(fleet.entries[0])


def test_entry_built_in_code_has_registry_defaults() -> None:
    """A RepoEntry made in code defaults to both arches, ci on, branch main."""
    entry = RepoEntry(name="x", repo="o/x", status="active", duration_s=90.0)

    assert entry.nightly_eligible
    assert entry.arches == ARCH_BOTH
    assert entry.branch == "main"
    assert entry.to_dict() == {"name": "x", "repo": "o/x", "status": "active", "duration": "90s"}


# ── bad input: one test per kind of problem ─────────────────────────────────


def test_bad_repo_is_refused(tmp_path: Path) -> None:
    """A repo that is not owner/name names the entry and field 'repo'."""
    message = entry_error(tmp_path, repo="just-a-name")
    assert "repos[1] (name 'lab-two'), field 'repo': invalid repository 'just-a-name'" in message


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    """An arch outside ARCHES, alone or in a list, is refused with the allowed list."""
    message = entry_error(tmp_path, arch=["arm64", "riscv"])
    assert "repos[1] (name 'lab-two'), field 'arch': unknown arch 'riscv'" in message
    assert "expected one of arm64, amd64" in message


def test_empty_arch_list_is_refused(tmp_path: Path) -> None:
    """An empty arch list would run nowhere, so it is refused."""
    message = entry_error(tmp_path, arch=[])
    assert "repos[1] (name 'lab-two'), field 'arch': expected an arch or a non-empty" in message


def test_duplicate_name_is_refused(tmp_path: Path) -> None:
    """A second entry with an existing name (any case) points at the first one."""
    message = entry_error(tmp_path, name="Lab-One")
    assert "repos[1] (name 'Lab-One'), field 'name': duplicate name 'Lab-One'" in message
    assert "already used by repos[0]" in message


def test_duplicate_repo_is_refused(tmp_path: Path) -> None:
    """Two entries for one GitHub repository (any case) are refused: by_repo needs one."""
    message = entry_error(tmp_path, repo="ACME/lab-one")
    assert "repos[1] (name 'lab-two'), field 'repo': duplicate repo 'ACME/lab-one'" in message


def test_bad_duration_is_refused(tmp_path: Path) -> None:
    """A duration not like 20m / 1.5h / 30min / 90s names the entry, field and value."""
    message = entry_error(tmp_path, duration="two hours")
    assert "repos[1] (name 'lab-two'), field 'duration': invalid duration 'two hours'" in message


def test_numeric_duration_is_refused(tmp_path: Path) -> None:
    """A bare number has no unit, so it is refused rather than guessed."""
    message = entry_error(tmp_path, duration=90)
    assert "repos[1] (name 'lab-two'), field 'duration': invalid duration 90" in message


def test_unknown_status_is_refused_with_allowed_list(tmp_path: Path) -> None:
    """A status outside STATUSES is refused and the message lists the allowed values."""
    message = entry_error(tmp_path, status="retired")
    assert "repos[1] (name 'lab-two'), field 'status': unknown status 'retired'" in message
    assert f"expected one of {', '.join(STATUSES)}" in message


@pytest.mark.parametrize("key", ["name", "repo", "status"])
def test_missing_required_key_is_refused(tmp_path: Path, key: str) -> None:
    """Each of name, repo and status is required."""
    message = entry_error(tmp_path, **{key: DROP})
    where = "repos[1]" if key == "name" else "repos[1] (name 'lab-two')"
    assert f"{where}, field {key!r}: missing required key" in message


def test_ci_must_be_a_bool(tmp_path: Path) -> None:
    """ci: "false" (a string) is refused; only true or false are accepted."""
    message = entry_error(tmp_path, ci="false")
    assert "repos[1] (name 'lab-two'), field 'ci': expected true or false, got 'false'" in message


def test_bad_branch_is_refused(tmp_path: Path) -> None:
    """A branch git or a shell would misread (leading '-', '..') is refused."""
    message = entry_error(tmp_path, branch="--upload-pack=x")
    assert "repos[1] (name 'lab-two'), field 'branch': invalid branch '--upload-pack=x'" in message


def test_tags_must_be_a_list_of_strings(tmp_path: Path) -> None:
    """tags given as one string, or holding a non-string, are refused."""
    for tags in ("kubernetes", ["kubernetes", 3]):
        message = entry_error(tmp_path, tags=tags)
        assert "repos[1] (name 'lab-two'), field 'tags': expected a list of non-empty" in message


def test_bad_name_is_refused(tmp_path: Path) -> None:
    """A name with characters unsafe in keys and paths is refused."""
    message = entry_error(tmp_path, name="../etc")
    assert "repos[1] (name '../etc'), field 'name': invalid name '../etc'" in message


def test_non_string_key_is_refused(tmp_path: Path) -> None:
    """A key that YAML reads as a number is refused instead of kept in extra."""
    path = tmp_path / "repos.yaml"
    path.write_text("repos:\n  - {name: a, repo: o/a, status: active, 2024: x}\n")
    message = fleet_error(path)
    assert "repos[0] (name 'a'), key 2024: keys must be strings" in message


def test_non_mapping_entry_is_refused(tmp_path: Path) -> None:
    """An entry that is a plain string names its index."""
    message = fleet_error(write_fleet(tmp_path, [GOOD, "acme/lab-two"]))
    assert "repos[1]: expected a mapping of keys to values, got 'acme/lab-two'" in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    """Broken indentation is reported with the file, line and column."""
    path = tmp_path / "repos.yaml"
    path.write_text("repos:\n  - name: a\n    repo: o/a\n   status: active\n")
    message = fleet_error(path)
    assert "invalid YAML at line 4, column 4" in message


@pytest.mark.parametrize(
    "text", ["", "repos: []\n", "repos:\n", "repos: {name: a}\n", "- name: a\n", "other: 1\n"]
)
def test_missing_empty_or_non_list_repos_is_refused(tmp_path: Path, text: str) -> None:
    """An empty file, or repos missing, empty or not a list, names the field 'repos'."""
    path = tmp_path / "repos.yaml"
    path.write_text(text)
    assert "field 'repos': expected a non-empty top-level list" in fleet_error(path)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    """Problems in several entries and fields come back in one error, not just the first."""
    entries = [GOOD, {"name": "b", "repo": "bad", "status": "gone", "arch": "x"}, 7, GOOD]
    message = fleet_error(write_fleet(tmp_path, entries))

    assert "6 problem(s)" in message
    for part in [
        "repos[1] (name 'b'), field 'repo'",
        "repos[1] (name 'b'), field 'status'",
        "repos[1] (name 'b'), field 'arch'",
        "repos[2]: expected a mapping",
        "repos[3] (name 'lab-one'), field 'name': duplicate",
        "repos[3] (name 'lab-one'), field 'repo': duplicate",
    ]:
        assert part in message


def test_long_problem_lists_are_cut_short(tmp_path: Path) -> None:
    """With hundreds of problems the message lists 50 and counts the rest."""
    message = fleet_error(write_fleet(tmp_path, list(range(300))))
    assert "300 problem(s)" in message
    assert "... and 250 more" in message
    assert message.count("\n  - ") == 50


def test_python_tags_are_not_executed(tmp_path: Path) -> None:
    """A python/object tag is refused by the safe loader, never constructed."""
    marker = tmp_path / "pwned"
    path = tmp_path / "repos.yaml"
    path.write_text(f"repos: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "could not determine a constructor" in fleet_error(path)
    assert not marker.exists()


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """A billion-laughs document is refused in well under a second."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "repos.yaml"
    path.write_text("\n".join(lines) + "\nrepos: [*a9]\n")
    started = time.perf_counter()

    assert "aliases expand to more than" in fleet_error(path)
    assert time.perf_counter() - started < 1.0


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    """A list that contains itself is refused instead of looping."""
    path = tmp_path / "repos.yaml"
    path.write_text("repos: &r [*r]\n")
    assert "aliases expand to more than" in fleet_error(path)


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    """Nesting deep enough to exhaust the parser's recursion is a FleetError."""
    path = tmp_path / "repos.yaml"
    path.write_text("repos: " + "[" * 3_000 + "]" * 3_000 + "\n")
    assert "invalid YAML" in fleet_error(path)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    """A file over MAX_FLEET_BYTES is refused before parsing."""
    path = tmp_path / "repos.yaml"
    path.write_text("# padding\n" * (MAX_FLEET_BYTES // 10 + 1))
    assert f"larger than the {MAX_FLEET_BYTES}-byte limit" in fleet_error(path)
    with pytest.raises(FleetError, match="over the"):
        parse_fleet(" " * (MAX_FLEET_BYTES + 1), source="big.yaml")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A path that does not exist names the path and the OS reason."""
    assert "cannot read the fleet registry: No such file" in fleet_error(tmp_path / "no.yaml")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused with their offset."""
    path = tmp_path / "repos.yaml"
    path.write_bytes(b"repos:\n  - name: \xff\n")
    assert "not UTF-8 text (bad byte at offset 17)" in fleet_error(path)


def test_a_key_given_twice_in_an_entry_is_refused() -> None:
    """``repo:`` twice in one entry is an error with its line, not a silent last-wins."""
    text = "repos:\n  - name: x\n    repo: a/x\n    repo: a/evil\n    status: active\n"
    with pytest.raises(FleetError, match=r"line 4.*key 'repo' is given twice"):
        parse_fleet(text, "dup.yaml")
