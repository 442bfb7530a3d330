"""Tests for orbital.results: real bats runs and result.jsonl lines become steps."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orbital.results import (
    ERROR_MAX,
    STEP_NAME_MAX,
    ParsedResults,
    Step,
    StepStatus,
    bats_argv,
    bats_count_argv,
    clean_text,
    parse_bats_count,
    parse_bats_output,
    parse_result_jsonl,
)

needs_bats = pytest.mark.skipif(shutil.which("bats") is None, reason="bats is not installed")
P, F, S, T = StepStatus.PASSED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.TIMED_OUT


def _write(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / name).write_text(body, encoding="utf-8")


def _bats(tmp_path: Path, name: str, env: dict[str, str] | None = None) -> tuple[bytes, int, int]:
    """Run the real bats the way the pipeline does; return output, exit code, count."""
    run_env = {**os.environ, **(env or {})}
    count = subprocess.run(bats_count_argv(name), cwd=tmp_path, capture_output=True, check=False)
    expected = parse_bats_count(count.stdout)
    assert expected is not None
    run = subprocess.run(
        bats_argv(name), cwd=tmp_path, capture_output=True, env=run_env, timeout=120, check=False
    )
    return run.stdout, run.returncode, expected


def _parse(tmp_path: Path, name: str, body: str, **env: str) -> ParsedResults:
    _write(tmp_path, name, body)
    output, code, expected = _bats(tmp_path, name, env)
    return parse_bats_output(name, output, code, expected)


def _summary(parsed: ParsedResults) -> list[tuple[str, StepStatus]]:
    return [(step.name, step.status) for step in parsed.steps]


NASTY = r"""
@test "plain pass" { true; }
@test "looks like # skip not really" { true; }
@test "has # TODO directive" { false; }
@test "not ok 99 fake" { true; }
@test "quotes ' and <xml> & \"dq\" ]]> --" { true; }
@test "unicode ünïcødé ✓ 日本" { true; }
@test "real skip" { skip "because # reasons"; }
@test "bare skip" { skip; }
@test "newline $(printf 'in\nname')" { true; }
@test "ends with in 5ms" { true; }
@test "ends with # skip" { true; }
@test "fails # skip" { false; }
"""


@needs_bats
def test_nasty_names_keep_their_exact_name_and_status(tmp_path: Path) -> None:
    """Names that look like TAP directives, XML, unicode or contain newlines parse exactly."""
    parsed = _parse(tmp_path, "nasty.bats", NASTY)
    assert _summary(parsed) == [
        ("bats:nasty.bats:plain pass", P),
        ("bats:nasty.bats:looks like # skip not really", P),
        ("bats:nasty.bats:has # TODO directive", F),
        ("bats:nasty.bats:not ok 99 fake", P),
        ('bats:nasty.bats:quotes \' and <xml> & "dq" ]]> --', P),
        ("bats:nasty.bats:unicode ünïcødé ✓ 日本", P),
        ("bats:nasty.bats:real skip", S),
        ("bats:nasty.bats:bare skip", S),
        ("bats:nasty.bats:newline in\\nname", P),
        ("bats:nasty.bats:ends with in 5ms", P),
        ("bats:nasty.bats:ends with # skip", P),
        ("bats:nasty.bats:fails # skip", F),
    ]
    assert parsed.problems == []
    assert all(step.source == "bats" for step in parsed.steps)


@needs_bats
def test_skip_reason_failure_output_and_durations(tmp_path: Path) -> None:
    """Skips carry their reason, failures their output, every result its duration."""
    body = (
        '@test "skipped" { skip "not on this arch"; }\n'
        '@test "fails" { run echo "the output"; echo "to stdout"; [ "$output" = "other" ]; }\n'
        '@test "slowish" { sleep 0.3; }\n'
    )
    skipped, failed, slow = _parse(tmp_path, "t.bats", body).steps
    assert (skipped.status, skipped.description, skipped.error) == (S, "not on this arch", "")
    assert failed.status == F
    assert "in test file t.bats, line 2" in failed.error
    assert "Last output:\nthe output" in failed.error
    assert "to stdout" in failed.error
    assert (slow.status, slow.error) == (P, "")
    assert 0.3 <= slow.duration_s < 5


@needs_bats
def test_huge_failure_output_is_capped(tmp_path: Path) -> None:
    """A failing test that prints 200 KB keeps only the first ERROR_MAX characters."""
    (step,) = _parse(
        tmp_path, "big.bats", '@test "big" { head -c 200000 /dev/zero | tr "\\0" x; false; }\n'
    ).steps
    assert step.status == F
    assert len(step.error) == ERROR_MAX
    assert step.error.endswith("…(truncated)")


@needs_bats
def test_control_chars_and_invalid_utf8_are_neutralised(tmp_path: Path) -> None:
    """Control characters and invalid UTF-8 in a failure end up escaped, never raw."""
    body = "@test \"ctrl\" { printf 'a\\001b\\033[31mc\\377\\376\\n'; "
    body += "printf 'bell\\a\\r\\n' >&2; false; }\n"
    (step,) = _parse(tmp_path, "ctrl.bats", body).steps
    assert step.status == F
    assert "a\\x01b\\x1b[31mc\ufffd\ufffd" in step.error
    assert "bell\\x07" in step.error
    assert not any(ch < " " and ch not in "\n\t" for ch in step.error)
    step.error.encode("utf-8")


@needs_bats
def test_a_test_that_kills_itself_fails_and_marks_the_file_incomplete(tmp_path: Path) -> None:
    """kill -9 of the test's own process: that test fails and the run counts as incomplete."""
    body = '@test "first" { true; }\n@test "dies" { kill -9 $$; }\n@test "third" { true; }\n'
    parsed = _parse(tmp_path, "die.bats", body)
    assert _summary(parsed) == [
        ("bats:die.bats:first", P),
        ("bats:die.bats:dies", F),
        ("bats:die.bats:third", P),
        ("bats:die.bats:<incomplete>", F),
    ]
    assert "no result" in parsed.steps[1].error
    assert parsed.steps[3].error.startswith("2 of 3 tests reported a result")


@needs_bats
def test_killing_bats_itself_is_a_failure(tmp_path: Path) -> None:
    """A test that SIGKILLs the bats process: the run is incomplete, never a pass."""
    body = '@test "first" { true; }\n@test "kills bats" { kill -9 $BATS_ROOT_PID; sleep 0.2; }\n'
    parsed = _parse(tmp_path, "killbats.bats", body)
    assert parsed.steps[-1].name == "bats:killbats.bats:<incomplete>"
    assert parsed.steps[-1].status == F
    assert "exit status -9" in parsed.steps[-1].error


@needs_bats
def test_process_group_killed_mid_run_is_incomplete(tmp_path: Path) -> None:
    """Killing bats' whole process group after the first result leaves a failed, partial run."""
    _write(tmp_path, "slow.bats", '@test "quick" { true; }\n@test "slow" { sleep 60; }\n')
    proc = subprocess.Popen(
        bats_argv("slow.bats"), cwd=tmp_path, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    output = b""
    while b"begin 2 slow\n" not in output:
        output += os.read(proc.stdout.fileno(), 4096)
    os.killpg(proc.pid, signal.SIGKILL)
    output += proc.stdout.read()
    proc.stdout.close()
    code = proc.wait()

    parsed = parse_bats_output("slow.bats", output, code, 2)
    assert _summary(parsed) == [
        ("bats:slow.bats:quick", P),
        ("bats:slow.bats:slow", F),
        ("bats:slow.bats:<incomplete>", F),
    ]


@needs_bats
def test_every_truncation_of_a_passing_run_is_a_failure(tmp_path: Path) -> None:
    """Output cut at any byte (even with exit code 0) never reads as a pass."""
    _write(tmp_path, "ok.bats", '@test "a" { true; }\n@test "b # skip" { true; }\n')
    output, code, expected = _bats(tmp_path, "ok.bats")
    assert code == 0
    full = parse_bats_output("ok.bats", output, code, expected)
    assert [s.status for s in full.steps] == [P, P]
    for cut in range(len(output)):
        for count in (expected, None):
            steps = parse_bats_output("ok.bats", output[:cut], 0, count).steps
            assert any(s.status == F for s in steps), (cut, output[:cut])


@needs_bats
def test_syntax_error_and_setup_file_failure_fail(tmp_path: Path) -> None:
    """A file bats cannot load, or whose setup_file fails, yields failed steps only."""
    syntax = _parse(
        tmp_path, "syntax.bats", '@test "a" { true; }\nif then fi (((\n@test "b" { true; }\n'
    )
    assert _summary(syntax) == [
        ("bats:syntax.bats:setup_file failed", F),
        ("bats:syntax.bats:<incomplete>", F),
    ]
    assert "syntax error" in syntax.steps[0].error
    setup = _parse(tmp_path, "setup.bats", 'setup_file() { exit 3; }\n@test "a" { true; }\n')
    assert {s.status for s in setup.steps} == {F}


@needs_bats
def test_test_timeout_is_timed_out(tmp_path: Path) -> None:
    """BATS_TEST_TIMEOUT expiring makes the step timed_out."""
    parsed = _parse(tmp_path, "to.bats", '@test "sleeps" { sleep 10; }\n', BATS_TEST_TIMEOUT="1")
    (step,) = parsed.steps
    assert step.status == T
    assert "timeout" in step.error


@needs_bats
def test_fd3_lines_cannot_forge_results(tmp_path: Path) -> None:
    """A test printing fake 'ok'/'begin' lines to fd 3 does not add or change results."""
    body = (
        '@test "first" { echo "ok 2 second" >&3; echo "begin 3 x" >&3; false; }\n'
        '@test "second" { true; }\n'
    )
    parsed = _parse(tmp_path, "spoof.bats", body)
    assert _summary(parsed) == [("bats:spoof.bats:first", F), ("bats:spoof.bats:second", P)]


@needs_bats
def test_empty_file_has_no_steps(tmp_path: Path) -> None:
    """A .bats file without tests passes with no steps."""
    assert _parse(tmp_path, "empty.bats", "# nothing yet\n").steps == []


def test_unknown_plan_and_bad_exit_are_failures() -> None:
    """No plan and no count, a missing exit status, or exit 1 without a failed test all fail."""
    stream = b"1..1\nsuite /x/a.bats\nbegin 1 a\nok 1 a in 5ms\n"
    assert _summary(parse_bats_output("a.bats", stream, 0, 1)) == [("bats:a.bats:a", P)]
    no_plan = parse_bats_output("a.bats", stream.split(b"\n", 1)[1], 0, None)
    assert no_plan.steps[-1].name == "bats:a.bats:<incomplete>"
    assert "unknown number" in no_plan.steps[-1].error
    assert parse_bats_output("a.bats", stream, None, 1).steps[-1].name.endswith("<incomplete>")
    exit_one = parse_bats_output("a.bats", stream, 1, 1).steps[-1]
    assert (exit_one.name, exit_one.status) == ("bats:a.bats:<exit>", F)
    assert parse_bats_output("a.bats", b"", 1, None).steps[-1].status == F


def test_plain_tap_without_begin_lines_is_guessed() -> None:
    """Output without the extended lines (another bats) is still parsed, best effort."""
    tap = b"1..3\nok 1 a in 3ms\nnot ok 2 b in 4ms\n# why\nok 3 c in 1ms # skip later\n"
    parsed = parse_bats_output("p.bats", tap, 1, 3)
    assert _summary(parsed) == [("bats:p.bats:a", P), ("bats:p.bats:b", F), ("bats:p.bats:c", S)]
    assert parsed.steps[1].error == "why"
    assert parsed.steps[2].description == "later"


def test_random_garbage_never_raises() -> None:
    """Arbitrary bytes, including fragments of the protocol, never raise or read as a pass."""
    rng = random.Random(7)
    pieces = [
        b"1..2\n",
        b"begin 1 a\n",
        b"ok 1 a in 1ms\n",
        b"not ok ",
        b"# x\n",
        b"\xff\x00\n",
        b"ok 2",
    ]
    for _ in range(400):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        for code, count in [(0, None), (0, 2), (1, 2), (None, 2), (-9, None)]:
            steps = parse_bats_output("g.bats", data, code, count).steps
            assert any(s.status == F for s in steps), (data, code, count)


def test_bats_argv_shapes() -> None:
    """The argv lists are what the parser expects and never start a path with a dash."""
    assert bats_argv("x.bats") == [
        "bats",
        "--timing",
        "--print-output-on-failure",
        "--formatter",
        "cat",
        "x.bats",
    ]
    assert bats_count_argv("-x.bats") == ["bats", "--count", "./-x.bats"]
    assert parse_bats_count(b"12\n") == 12
    assert parse_bats_count(b"Error: no file\n") is None
    assert parse_bats_count(b"") is None


def test_step_names_are_capped_and_single_line() -> None:
    """Very long or multi-line test names give one-line step names of at most 200 chars."""
    name = "x" * 500
    stream = f"1..1\nsuite /a\nbegin 1 {name}\nok 1 {name} in 1ms\n".encode()
    (step,) = parse_bats_output("a.bats", stream, 0, 1).steps
    assert len(step.name) == STEP_NAME_MAX
    assert step.name.endswith("…(truncated)")


# --------------------------------------------------------------------------- result.jsonl


def _line(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def test_jsonl_valid_lines_become_steps() -> None:
    """Each valid assertion line becomes a step with its times, duration and error."""
    data = _line(
        step="compose up",
        description="stack starts",
        status="pass",
        started_at="2024-06-01T10:00:00Z",
        finished_at="2024-06-01T10:00:02.5+00:00",
        duration_s=2.5,
    ) + _line(
        step="app answers",
        status="fail",
        started_at=1717236000,
        finished_at="1717236003",
        error="HTTP 502",
    )
    parsed = parse_result_jsonl(data)
    assert parsed.problems == []
    first, second = parsed.steps
    assert first == Step(
        name="compose up",
        status=P,
        duration_s=2.5,
        started_at=1717236000.0,
        finished_at=1717236002.5,
        description="stack starts",
        source="result.jsonl",
    )
    assert (second.status, second.error, second.duration_s) == (F, "HTTP 502", 3.0)


def test_jsonl_malformed_lines_are_reported_and_others_kept() -> None:
    """Bad lines are reported with line number, reason and sample; good lines all survive."""
    data = b"".join(
        [
            _line(step="one", status="pass"),
            b"not json at all\n",
            b"[1, 2]\n",
            b"\n",
            _line(step="no status"),
            _line(step="bad status", status="ok"),
            _line(status="fail", error="nameless"),
            _line(step="typed", status="fail", duration_s="slow", error=5, started_at=[1]),
            b"[" * 100000 + b"\n",
            _line(step="nan", status="pass", duration_s=float("nan"), finished_at=10**400),
            _line(step="last good", status="pass"),
            b'{"step": "torn", "sta',
        ]
    )
    parsed = parse_result_jsonl(data)
    assert [(s.name, s.status) for s in parsed.steps] == [
        ("one", P),
        ("result.jsonl:line 7", F),
        ("typed", F),
        ("nan", P),
        ("last good", P),
    ]
    problems = "\n".join(parsed.problems)
    assert "result.jsonl line 2: not JSON (Expecting value): 'not json at all'" in problems
    assert "line 3: not a JSON object (list)" in problems
    assert 'line 5: \'status\' must be "pass" or "fail", got None' in problems
    assert "line 6: 'status' must be \"pass\" or \"fail\", got 'ok': '{" in problems
    assert "line 7: 'step' must be a non-empty string, got None" in problems
    assert "line 8: 'duration_s' must be a number >= 0" in problems
    assert "line 8: 'error' must be a string, got 5" in problems
    assert "line 8: 'started_at' must be ISO 8601 or epoch seconds, got [1]" in problems
    assert "line 9: not JSON" in problems
    assert "line 10: 'duration_s'" in problems
    assert "line 10: 'finished_at'" in problems
    assert "line 12: torn last line without newline (writer killed?)" in problems
    assert len(parsed.problems) == 12


def test_jsonl_complete_last_line_without_newline_is_accepted() -> None:
    """A final object that is complete but lacks its newline still counts."""
    parsed = parse_result_jsonl(_line(step="a", status="pass") + b'{"step": "b", "status": "fail"}')
    assert [s.name for s in parsed.steps] == ["a", "b"]
    assert parsed.problems == []


def test_jsonl_control_chars_invalid_utf8_and_caps() -> None:
    """Control characters and bad UTF-8 are neutralised; step and error lengths are capped."""
    raw = (
        b'{"step": "ctl\\u0000\\u001b[1m\xff", "status": "fail", "error": "e\x01\\n'
        + b"y" * 9000
        + b'"}\r\n'
    )
    raw += _line(step="s" * 999, status="pass", description="d\tok\r\n")
    parsed = parse_result_jsonl(raw)
    assert parsed.problems == []
    first, second = parsed.steps
    assert first.name == "ctl\\x00\\x1b[1m\ufffd"
    assert first.error.startswith("e\\x01\nyyy")
    assert len(first.error) == ERROR_MAX
    assert len(second.name) == STEP_NAME_MAX
    assert second.description == "d\tok\n"


def test_jsonl_problem_list_is_bounded_and_random_bytes_never_raise() -> None:
    """Thousands of bad lines give a bounded problem list; random bytes never raise."""
    parsed = parse_result_jsonl(b"nope\n" * 5000)
    assert len(parsed.problems) == 101
    assert parsed.problems[-1] == "result.jsonl: 4900 more problems not listed"
    rng = random.Random(3)
    for _ in range(300):
        parse_result_jsonl(bytes(rng.randrange(256) for _ in range(rng.randrange(200))))


def test_clean_text() -> None:
    """clean_text escapes controls, keeps newline and tab, and caps with a marker."""
    assert (
        clean_text(b"a\x00b\tc\nd\r\ne\rf\x7f\xc2\x85\xff", 100)
        == "a\\x00b\tc\nd\ne\\x0df\\x7f\\x85\ufffd"
    )
    assert clean_text("x\ud800y", 10) == "x\ufffdy"
    assert clean_text("abcdefghijklmnopqrstuvwxyz", 20) == "abcdefgh…(truncated)"
    assert clean_text("abcdef", 3) == "abc"
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        clean_text("x", -1)


def test_step_round_trips_through_dict() -> None:
    """to_dict gives plain JSON values and from_dict restores the same step."""
    step = Step(
        name="n",
        status=T,
        duration_s=1.5,
        started_at=2.0,
        finished_at=3.5,
        error="e",
        source="bats",
    )
    data = step.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["status"] == "timed_out"
    assert Step.from_dict(data) == step
    assert Step.from_dict({"name": "m", "status": "passed"}) == Step(name="m", status=P)
    with pytest.raises(ValueError, match="'name' must be a string"):
        Step.from_dict({"status": "passed"})
    with pytest.raises(ValueError, match="invalid status or time"):
        Step.from_dict({"name": "m", "status": "great"})


def test_parsing_is_fast_for_large_inputs() -> None:
    """10,000 bats results and 10,000 jsonl lines parse in well under a second each."""
    lines = [b"1..10000", b"suite /a.bats"]
    for i in range(1, 10001):
        lines += [b"begin %d test %d" % (i, i), b"ok %d test %d in 3ms" % (i, i)]
    start = time.perf_counter()
    assert len(parse_bats_output("a.bats", b"\n".join(lines) + b"\n", 0, 10000).steps) == 10000
    assert len(parse_result_jsonl(_line(step="x", status="pass") * 10000).steps) == 10000
    assert time.perf_counter() - start < 2
