"""Turning what a lab run produced into build steps: BATS output and ``result.jsonl``.

BATS: the pipeline runs :func:`bats_count_argv` and :func:`bats_argv` once per file and hands
the output to :func:`parse_bats_output`. We read bats' internal *extended* stream
(``--formatter cat``, accepted by bats 1.5+ but not advertised), not TAP or JUnit: bats 1.8
writes ``begin <n> <name>`` before each result, so ``ok <n> <name>[ in <ms>ms][ # skip ...]``
splits exactly at the known name. TAP and JUnit classify by a regex on the line instead
(with bats 1.8.2 a *passing* test named ``a # skip b`` is reported skipped by both); JUnit
also cuts names at newlines, leaves raw control characters that make the XML unparseable,
and writes nothing if its formatter is killed. The extended stream is written as tests
finish, so a killed run still yields every finished result. A run cut short is a failure.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ParsedResults",
    "Step",
    "StepStatus",
    "bats_argv",
    "bats_count_argv",
    "clean_text",
    "parse_bats_count",
    "parse_bats_output",
    "parse_result_jsonl",
]

logger = logging.getLogger(__name__)

STEP_NAME_MAX = 200
ERROR_MAX = 4000
DESCRIPTION_MAX = 1000
PROBLEMS_MAX = 100
_TRUNCATED = "…(truncated)"
# C0 controls except \t and \n, DEL, C1 controls, and lone surrogates (not encodable).
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SAMPLE_MAX = 80
_TIME_KEYS = ("duration_s", "started_at", "finished_at")
_TEXT_KEYS = ("error", "description", "source")


class StepStatus(enum.StrEnum):
    """Outcome of one step of a build."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    ERROR = "error"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


@dataclass
class Step:
    """One step of a build: a pipeline stage, a BATS test or a result.jsonl assertion.

    Times are epoch seconds (0.0 when unknown); ``source`` is ``"pipeline"``, ``"bats"`` or
    ``"result.jsonl"``.
    """

    name: str
    status: StepStatus
    duration_s: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    description: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; :meth:`from_dict` reverses it."""
        data = asdict(self)
        data["status"] = str(self.status)
        return data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        """Build a step from :meth:`to_dict` output.

        Raises:
            ValueError: ``name`` is not a string, or ``status`` or a time is not valid.
        """
        name = d.get("name")
        if not isinstance(name, str):
            raise ValueError(f"step field 'name' must be a string, got {name!r}")
        try:
            status = StepStatus(str(d.get("status")))
            duration, started, finished = (float(d.get(k) or 0.0) for k in _TIME_KEYS)
        except (TypeError, ValueError) as err:
            raise ValueError(f"step {name!r} has an invalid status or time: {err}") from None
        error, description, source = (str(d.get(k) or "") for k in _TEXT_KEYS)
        return cls(name, status, duration, started, finished, error, description, source)


@dataclass
class ParsedResults:
    """Steps parsed from one source, and human-readable problems met on the way."""

    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def clean_text(text: str | bytes, limit: int) -> str:
    """Make untrusted text safe to store and show.

    Bytes are decoded as UTF-8 with replacement; control characters other than newline and
    tab become visible ``\\xNN`` escapes (lone surrogates become U+FFFD); text longer than
    ``limit`` characters is cut and ends with ``…(truncated)``.

    Raises:
        ValueError: ``limit`` is negative.
    """
    if limit < 0:
        raise ValueError(f"clean_text limit must be >= 0, got {limit}")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = _CONTROL_RE.sub(_escape_control, text.replace("\r\n", "\n"))
    if len(text) <= limit:
        return text
    if limit <= len(_TRUNCATED):
        return text[:limit]
    return text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return "\ufffd" if 0xD800 <= code <= 0xDFFF else f"\\x{code:02x}"


def _sample(value: object) -> str:
    """A short, safe repr of an offending value for a problem message."""
    return clean_text(repr(value), _SAMPLE_MAX)


# --------------------------------------------------------------------------- result.jsonl


def parse_result_jsonl(data: bytes) -> ParsedResults:
    """Turn the lab's ``result.jsonl`` into steps.

    Every valid line becomes a step (source ``"result.jsonl"``). A line that is not JSON, not
    an object, or lacks a ``"pass"``/``"fail"`` status is reported in ``problems`` and
    skipped; a line with a valid status but a bad field keeps its step and is also reported.
    A last line without a newline is accepted when it parses (otherwise it is reported as
    torn). Never raises on bad input.
    """
    result = ParsedResults()
    lines = data.split(b"\n")
    tail = lines.pop()
    numbered = [(n, raw, False) for n, raw in enumerate(lines, 1)]
    if tail.strip():
        numbered.append((len(lines) + 1, tail, True))

    for number, raw, torn in numbered:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        step, reasons = _parse_jsonl_line(number, text, torn)
        if step is not None:
            result.steps.append(step)
        result.problems.extend(f"result.jsonl line {number}: {r}" for r in reasons)

    if len(result.problems) > PROBLEMS_MAX:
        extra = len(result.problems) - PROBLEMS_MAX
        result.problems[PROBLEMS_MAX:] = [f"result.jsonl: {extra} more problems not listed"]
    return result


def _parse_jsonl_line(number: int, text: str, torn: bool) -> tuple[Step | None, list[str]]:
    sample = _sample(text[: _SAMPLE_MAX * 2])
    try:
        record = json.loads(text, strict=False)
    except (ValueError, RecursionError) as err:
        why = "torn last line without newline (writer killed?)" if torn else "not JSON"
        return None, [f"{why} ({getattr(err, 'msg', err)}): {sample}"]
    if not isinstance(record, dict):
        return None, [f"not a JSON object ({type(record).__name__}): {sample}"]

    status = record.get("status")
    if not isinstance(status, str) or status not in ("pass", "fail"):
        return None, [f'\'status\' must be "pass" or "fail", got {_sample(status)}: {sample}']
    reasons: list[str] = []
    name = record.get("step")
    if not isinstance(name, str) or not name.strip():
        reasons.append(f"'step' must be a non-empty string, got {_sample(name)}")
        name = f"result.jsonl:line {number}"
    step = Step(
        name=clean_text(name, STEP_NAME_MAX),
        status=StepStatus.PASSED if status == "pass" else StepStatus.FAILED,
        description=clean_text(_text_field(record, "description", reasons), DESCRIPTION_MAX),
        error=clean_text(_text_field(record, "error", reasons), ERROR_MAX),
        started_at=_time_field(record, "started_at", reasons),
        finished_at=_time_field(record, "finished_at", reasons),
        source="result.jsonl",
    )
    step.duration_s = _duration_field(record, step, reasons)
    return step, reasons


def _text_field(record: dict[str, Any], key: str, reasons: list[str]) -> str:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value or ""
    reasons.append(f"'{key}' must be a string, got {_sample(value)}")
    return ""


def _time_field(record: dict[str, Any], key: str, reasons: list[str]) -> float:
    """Epoch seconds from an epoch number/string or an ISO 8601 time (naive means UTC)."""
    value = record.get(key)
    if value is None or value == "":
        return 0.0
    seconds = -1.0
    try:
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            seconds = float(value)
    except (ValueError, OverflowError):
        with contextlib.suppress(ValueError, OverflowError):
            moment = datetime.fromisoformat(str(value).strip())
            seconds = moment.replace(tzinfo=moment.tzinfo or UTC).timestamp()
    if math.isfinite(seconds) and seconds >= 0:
        return seconds
    reasons.append(f"'{key}' must be ISO 8601 or epoch seconds, got {_sample(value)}")
    return 0.0


def _duration_field(record: dict[str, Any], step: Step, reasons: list[str]) -> float:
    value = record.get("duration_s")
    if value is None:
        span = step.finished_at - step.started_at
        return span if step.started_at and step.finished_at and span >= 0 else 0.0
    with contextlib.suppress(TypeError, OverflowError):
        if not isinstance(value, bool | str) and math.isfinite(value) and value >= 0:
            return float(value)
    reasons.append(f"'duration_s' must be a number >= 0, got {_sample(value)}")
    return 0.0


# --------------------------------------------------------------------------- BATS


def bats_argv(path: str) -> list[str]:
    """The command that runs one BATS file in the form :func:`parse_bats_output` reads."""
    return ["bats", "--timing", "--print-output-on-failure", "--formatter", "cat", _arg(path)]


def bats_count_argv(path: str) -> list[str]:
    """The command that prints how many tests a BATS file announces; see parse_bats_count."""
    return ["bats", "--count", _arg(path)]


def _arg(path: str) -> str:
    return f"./{path}" if path.startswith("-") else path


def parse_bats_count(output: bytes) -> int | None:
    """The test count printed by :func:`bats_count_argv`, or None when there is none."""
    lines = output.decode("utf-8", errors="replace").split()
    return int(lines[-1]) if lines and lines[-1].isdigit() else None


_PLAN_RE = re.compile(r"1\.\.(\d+)")
_BEGIN_RE = re.compile(r"begin (\d+) ")
_RESULT_RE = re.compile(r"(not )?ok (\d+) ")
# What bats appends after the name: timing, then a skip or timeout directive.
_SUFFIX = r"(?: in (\d+)ms)?(?: # (skip)(?: (.*))?| # timeout after (\d+)s)?"
_SUFFIX_RE = re.compile(_SUFFIX)
# Only for a result without a usable begin line (file-level failures, plain TAP): a guess.
_GUESS_RE = re.compile(r"(.*?)" + _SUFFIX)
_MAX_NAME_LINES = 20
_FAILING = (StepStatus.FAILED, StepStatus.TIMED_OUT)


@dataclass
class _Test:
    index: int
    name: str
    begin_line: int = -1
    status: StepStatus | None = None
    duration_s: float = 0.0
    output: list[str] = field(default_factory=list)


class _BatsStream:
    """A pass over bats' extended stream; see the module docstring for the format."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.plan: int | None = None
        self.extended = False
        self.tests: list[_Test] = []
        self.begun: dict[int, _Test] = {}
        self.finished: dict[int, _Test] = {}
        self.other: list[str] = []

    def run(self) -> None:
        last: _Test | None = None
        i = 0
        while i < len(self.lines):
            line = self.lines[i]
            if i == 0 and (plan := _PLAN_RE.fullmatch(line)):
                self.plan = int(plan.group(1))
            elif line.startswith("suite "):
                self.extended = True
            elif (begin := _BEGIN_RE.match(line)) and int(begin.group(1)) == len(self.begun) + 1:
                begun = _Test(int(begin.group(1)), line[begin.end() :], begin_line=i)
                self.begun[begun.index] = begun
                self.tests.append(begun)
                last = None
            elif result := _RESULT_RE.match(line):
                finished, i = self._result(i, result)
                last = finished or last
            elif line.startswith("#") and last is not None and last.status in _FAILING:
                if not line.startswith("# bats warning:"):
                    last.output.append(line[2:])
            else:
                self.other = [*self.other[-19:], line]
            i += 1

    def _result(self, i: int, match: re.Match[str]) -> tuple[_Test | None, int]:
        """Record the result line at ``i``; return the test and the last line it used."""
        index, failed = int(match.group(2)), bool(match.group(1))
        test = self.begun.get(index)
        if index in self.finished or (test is None and self.extended and not failed):
            return None, i  # a duplicate, or a line the test printed to fd 3
        if test is not None:
            for extra in range(min(i - test.begin_line - 1, _MAX_NAME_LINES), -1, -1):
                name = "\n".join(self.lines[test.begin_line : test.begin_line + extra + 1])
                name = name[name.index(" ", 6) + 1 :]
                text = "\n".join(self.lines[i : i + extra + 1])[match.end() :]
                suffix = _SUFFIX_RE.fullmatch(text[len(name) :])
                if text.startswith(name) and suffix:
                    test.name = name
                    _apply(test, failed, suffix, 0)
                    self.finished[index] = test
                    return test, i + extra
            # The test changed its own description: fall back to guessing.
        guess = _GUESS_RE.fullmatch(self.lines[i], match.end())
        if guess is None:  # cannot happen: the pattern matches any single line
            return None, i
        if test is None:
            test = _Test(index, guess.group(1))
            self.tests.append(test)
        _apply(test, failed, guess, 1)
        self.finished[index] = test
        return test, i


def _apply(test: _Test, failed: bool, m: re.Match[str], base: int) -> None:
    millis, skip, reason, timeout = m.group(base + 1, base + 2, base + 3, base + 4)
    test.duration_s = int(millis) / 1000 if millis else 0.0
    if timeout:
        test.status = StepStatus.TIMED_OUT
    elif failed:
        test.status = StepStatus.FAILED
    elif skip:
        test.status = StepStatus.SKIPPED
        test.output = [reason] if reason else []
    else:
        test.status = StepStatus.PASSED


def parse_bats_output(
    file_name: str, output: bytes, exit_code: int | None, expected: int | None
) -> ParsedResults:
    """Turn one file's :func:`bats_argv` output into ``bats:<file>:<test>`` steps.

    Args:
        file_name: the file relative to the unit-test directory, e.g. ``"foo.bats"``.
        output: bats' captured stdout (stderr merged in is tolerated).
        exit_code: bats' exit status; None or a signal exit (negative, or >= 128) means the
            run was killed.
        expected: the count from :func:`parse_bats_count`, or None if unknown.

    Fewer results than announced, a killed bats or no plan at all add a failed
    ``bats:<file>:<incomplete>`` step; a non-zero exit with no failed test adds a failed
    ``bats:<file>:<exit>`` step. Never raises on bad input.
    """
    lines = output.decode("utf-8", errors="replace").split("\n")
    lines.pop()  # "" after the final newline, or a line torn by a killed writer
    stream = _BatsStream(lines)
    stream.run()

    steps = [_to_step(file_name, t) for t in stream.tests]
    announced = max((n for n in (expected, stream.plan) if n is not None), default=None)
    counted = stream.begun if stream.extended else stream.finished
    ran = sum(1 for n, t in counted.items() if t.status and n <= (announced or 0))
    killed = exit_code is None or exit_code < 0 or exit_code >= 128
    if killed or announced is None or ran < announced:
        why = "no exit status" if exit_code is None else f"exit status {exit_code}"
        error = f"{ran} of {announced if announced is not None else 'an unknown number of'} "
        error += f"tests reported a result; bats ended with {why}"
        if stream.other:
            error += "\nlast unrecognised output:\n" + "\n".join(stream.other)
        steps.append(_bats_step(file_name, "<incomplete>", StepStatus.FAILED, error))
        logger.warning("bats file %s: incomplete run (%s); recording it as failed", file_name, why)
    elif exit_code != 0 and all(s.status in (StepStatus.PASSED, StepStatus.SKIPPED) for s in steps):
        error = f"bats exited with status {exit_code} although no test failed"
        steps.append(_bats_step(file_name, "<exit>", StepStatus.FAILED, error))
    return ParsedResults(steps=steps, problems=[])


def _to_step(file_name: str, test: _Test) -> Step:
    if test.status is None:
        error = "the test started but bats reported no result (its process died or was killed)"
        return _bats_step(file_name, test.name, StepStatus.FAILED, error)
    output = "\n".join(test.output[:ERROR_MAX])[: ERROR_MAX + 1]  # clean_text caps it anyway
    step = _bats_step(file_name, test.name, test.status, output)
    step.duration_s = test.duration_s
    if step.status == StepStatus.SKIPPED:
        step.description, step.error = step.error, ""
    return step


def _bats_step(file_name: str, test: str, status: StepStatus, error: str) -> Step:
    name = f"bats:{file_name}:{test}".replace("\n", "\\n").replace("\t", "\\t")
    error = clean_text(error, ERROR_MAX) if status != StepStatus.PASSED else ""
    return Step(name=clean_text(name, STEP_NAME_MAX), status=status, error=error, source="bats")
