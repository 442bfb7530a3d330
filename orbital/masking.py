"""Secret masking for job output, before anything is stored or streamed.

Two kinds of secret are replaced by ``***``:

* configured secret **values**, matched exactly (at least 4 bytes; a value with newlines is
  masked line by line, because no match ever spans a newline);
* token **shapes**: GitHub tokens, Dynatrace tokens, AWS access key ids, ``Bearer`` /
  ``Api-Token`` / ``Authorization:`` header values, ``*PASSWORD=`` / ``*TOKEN=`` style
  assignments, and private key blocks (suppressed from ``BEGIN`` to ``END``).

Output arrives as arbitrary byte chunks. :class:`StreamMasker` emits complete lines at once
and holds back an incomplete line until it is longer than ``partial_line_max``; then it emits
all but the last ``holdback`` bytes (the longest secret plus the longest possible token
match). Every emitted piece is masked with up to ``holdback`` raw bytes on each side as
context, so a match that straddles two pieces is found from both, and each piece masks its
own part of it. Held-back data never exceeds ``partial_line_max`` bytes (at least
``2 * holdback``). Masking works on bytes: output that is not UTF-8 passes through unchanged.

Known limits: a shape value longer than its bound (about 400 bytes) is masked only up to the
bound; secrets are matched as raw UTF-8, not in encoded forms (URL or JSON escaping, base64).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["MASK", "MAX_TOKEN_BYTES", "MIN_SECRET_BYTES", "StreamMasker", "mask_text"]

logger = logging.getLogger(__name__)

MASK = b"***"
MIN_SECRET_BYTES = 4
MAX_TOKEN_BYTES = 600  # no pattern below can match more bytes; a test checks it
PARTIAL_LINE_MAX = 16 * 1024
KEY_BLOCK_MAX = 64 * 1024  # a PEM key is a few KB; past this a BEGIN was a false alarm

# Every quantifier is bounded so that MAX_TOKEN_BYTES holds, and no pattern matches a newline.
# Token shapes have no leading \b: colour codes such as "\x1b[1m" often run into them. Each
# pattern comes with lower-case trigger words; case-insensitive patterns run only when one of
# them occurs, because Python's re cannot skip ahead to an ignore-case literal and is slow.
_TOKEN_PATTERNS: tuple[tuple[tuple[bytes, ...], re.Pattern[bytes]], ...] = tuple(
    (triggers, re.compile(pattern))
    for triggers, pattern in (
        ((), rb"gh[pousr]_[A-Za-z0-9]{30,251}"),
        ((), rb"github_pat_[A-Za-z0-9_]{22,240}"),
        ((), rb"dt0[a-z][0-9]{2}\.[A-Z0-9]{24}\.[A-Z0-9]{64}"),
        ((), rb"(?:AKIA|ASIA)[A-Z0-9]{16}"),
        (
            (b"bearer", b"api-token"),
            rb"(?i)\b(?:bearer|api-token)[ \t]{1,8}(?P<v>[A-Za-z0-9._~+/=\-]{8,400})",
        ),
        (
            (b"authorization",),
            rb"(?i)\bauthorization[ \t]{0,8}:[ \t]{0,8}(?P<v>[^\s'\"][^\r\n'\"]{0,399})",
        ),
        (
            (b"password", b"passwd", b"secret", b"token", b"api_key", b"apikey"),
            rb"(?i)(?:password|passwd|secret|token|api_?key)[ \t]{0,8}=[ \t]{0,8}"
            rb"[\"']?(?P<v>[^\s'\"&;,]{1,400})",
        ),
    )
)
_KEY_BEGIN = re.compile(rb"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_KEY_END = re.compile(rb"-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
# At an idle flush: a tail that could be the start of a token or a key BEGIN line. (Key
# words before a value, such as "Bearer ", need not be held: they are seen as context.)
_IDLE_TAIL = re.compile(rb"(?:-{1,5}(?:BEGIN[A-Z0-9 ]{0,40})?)?[A-Za-z0-9_.+/=~\-]+\Z")


class StreamMasker:
    """Masks one output stream that arrives in chunks.

    Args:
        secrets: secret values to mask. Empty values are ignored; values shorter than
            ``MIN_SECRET_BYTES`` are ignored with a warning (masking them would mangle
            ordinary text).
        partial_line_max: how long an incomplete line may grow before part of it is emitted.
    """

    def __init__(self, secrets: Iterable[str], *, partial_line_max: int = PARTIAL_LINE_MAX):
        values: set[bytes] = set()
        for secret in secrets:
            for line in secret.split("\n"):
                raw = line.rstrip("\r").encode("utf-8", "surrogatepass")
                if len(raw) >= MIN_SECRET_BYTES:
                    values.add(raw)
                elif raw:
                    logger.warning(
                        "ignoring a configured secret (or secret line) of %d bytes: values "
                        "shorter than %d bytes are not masked",
                        len(raw),
                        MIN_SECRET_BYTES,
                    )

        self._secrets = sorted(values, key=len, reverse=True)
        self.holdback = max(map(len, self._secrets), default=0) + MAX_TOKEN_BYTES
        self.partial_line_max = max(partial_line_max, 2 * self.holdback)
        self._pending = bytearray()
        self._context = b""  # the last `holdback` raw bytes already emitted
        self._in_key = False
        self._key_bytes = 0

    @property
    def held_bytes(self) -> int:
        """How many bytes are held back, not yet emitted."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> bytes:
        """Add a chunk of output; return the masked bytes that are safe to emit now."""
        self._pending += chunk
        out = bytearray()
        newline = self._pending.rfind(b"\n")
        if newline >= 0:
            out += self._emit(newline + 1)
        if len(self._pending) > self.partial_line_max:
            out += self._emit(self._outside_markers(len(self._pending) - self.holdback))
        return bytes(out)

    def flush(self, *, final: bool = True) -> bytes:
        """Emit what is held back, masked.

        With ``final`` (end of stream) everything is emitted and the masker starts afresh.
        With ``final=False`` (an idle flush, so a prompt without newline shows up) a tail
        that could still be the start of a secret or token shape stays held back.
        """
        size = len(self._pending)
        if not final:
            size = self._outside_markers(size - self._idle_keep())
        out = self._emit(size)
        if final:
            self._context, self._in_key = b"", False
        return out

    def _idle_keep(self) -> int:
        """Length of the tail an idle flush keeps back."""
        data = bytes(self._pending)
        keep = 0
        for secret in self._secrets:
            for size in range(min(len(secret) - 1, len(data)), keep, -1):
                if data.endswith(secret[:size]):
                    keep = size
                    break
        tail = _IDLE_TAIL.search(data, max(0, len(data) - MAX_TOKEN_BYTES))
        return max(keep, len(data) - tail.start()) if tail else keep

    def _outside_markers(self, cut: int) -> int:
        """Move ``cut`` back so that it does not split a key BEGIN or END line."""
        for pattern in (_KEY_BEGIN, _KEY_END):
            for match in pattern.finditer(self._pending):
                if match.start() < cut < match.end():
                    cut = match.start()
        return max(cut, 0)

    def _emit(self, size: int) -> bytes:
        """Mask and emit the first ``size`` pending bytes, tracking private key blocks."""
        data = bytes(self._pending)
        out = bytearray()
        pos = 0
        while pos < size:
            if self._in_key:
                end = _KEY_END.search(data, pos, size)
                if end is not None:
                    self._in_key, pos = False, end.end()
                    continue
                self._key_bytes += size - pos
                if self._key_bytes <= KEY_BLOCK_MAX:
                    break
                logger.warning(
                    "no END line within %d bytes of a private key BEGIN line; "
                    "treating it as ordinary output again",
                    KEY_BLOCK_MAX,
                )
                self._in_key = False

            begin = _KEY_BEGIN.search(data, pos, size)
            stop = size if begin is None else begin.start()
            out += self._mask_plain(data, pos, stop)
            if begin is None:
                break
            out += MASK
            self._in_key, self._key_bytes, pos = True, 0, begin.end()

        emitted_tail = data[max(0, size - self.holdback) : size]
        self._context = (self._context + emitted_tail)[-self.holdback :]
        del self._pending[:size]
        return bytes(out)

    def _mask_plain(self, data: bytes, start: int, stop: int) -> bytes:
        """Mask ``data[start:stop]``, seeing ``holdback`` bytes around it as context."""
        before = data[max(0, start - self.holdback) : start]
        left = (self._context + before)[-self.holdback :] if len(before) < self.holdback else before
        window = left + data[start : stop + self.holdback]
        length = stop - start
        out = bytearray()
        pos = 0
        for span_start, span_end in self._spans(window):
            span_start, span_end = span_start - len(left), span_end - len(left)
            if span_end <= pos or span_start >= length:
                continue
            out += data[start + pos : start + max(span_start, pos)] + MASK
            pos = min(span_end, length)
        return bytes(out + data[start + pos : stop])

    def _spans(self, data: bytes) -> list[tuple[int, int]]:
        """Sorted, merged (start, end) ranges of every secret value and token match.

        Every start position is tried, so the result does not depend on where ``data`` was
        cut from the stream.
        """
        spans: list[tuple[int, int]] = []
        for secret in self._secrets:
            start, run_end = data.find(secret), -1
            while start >= 0:
                if start > run_end:  # else it overlaps the previous occurrence: extend that
                    spans.append((start, start))
                run_end = start + len(secret)
                spans[-1] = (spans[-1][0], run_end)
                start = data.find(secret, start + 1)
        lowered = data.lower()
        for triggers, pattern in _TOKEN_PATTERNS:
            if triggers and not any(word in lowered for word in triggers):
                continue
            group = "v" if "v" in pattern.groupindex else 0
            match = pattern.search(data)
            while match is not None:
                spans.append(match.span(group))
                match = pattern.search(data, match.start() + 1)

        merged: list[tuple[int, int]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged


def mask_text(text: str, secrets: Iterable[str]) -> str:
    """Mask a whole text at once (job records, events, error messages).

    Lone surrogates (for example from ``surrogateescape``) survive the round trip.
    """
    masker = StreamMasker(secrets)
    raw = text.encode("utf-8", "surrogatepass")
    masked = masker.feed(raw) + masker.flush()
    try:
        return masked.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # a shape's length bound cut a multi-byte character
        return masked.decode("utf-8", "replace")
