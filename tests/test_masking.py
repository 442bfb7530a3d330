"""Tests for orbital.masking: secret values and token shapes, whatever the chunking."""

from __future__ import annotations

import logging
import random
import re
import re._parser as sre_parser

import pytest

from orbital import masking
from orbital.masking import MAX_TOKEN_BYTES, StreamMasker, mask_text

SECRET = "s3cr3t-Value!"
RNG = random.Random(20240601)
UPPER_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _upper(n: int) -> str:
    return "".join(RNG.choice(UPPER_ALNUM) for _ in range(n))


GITHUB_CLASSIC = "ghp_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hJ6"
GITHUB_FINE = "github_pat_11ABCDEFG0123456789abc_" + "x1Y2z3" * 10
DYNATRACE = f"dt0c01.{_upper(24)}.{_upper(64)}"
DYNATRACE_S = f"dt0s16.{_upper(24)}.{_upper(64)}"
AWS_KEY = "AKIA" + _upper(16)
TOKENS = [GITHUB_CLASSIC, GITHUB_FINE, DYNATRACE, DYNATRACE_S, AWS_KEY]


def _stream(masker: StreamMasker, chunks: list[bytes]) -> bytes:
    return b"".join(masker.feed(chunk) for chunk in chunks) + masker.flush()


def test_secret_split_at_every_position_is_masked() -> None:
    """A secret split across two chunks at any byte is masked, and nothing else changes."""
    data = f"before {SECRET} middle {SECRET}\nafter {SECRET}".encode()
    expected = b"before *** middle ***\nafter ***"
    for cut in range(len(data) + 1):
        assert _stream(StreamMasker([SECRET]), [data[:cut], data[cut:]]) == expected, cut


def test_secret_split_into_three_chunks_at_every_pair_of_positions() -> None:
    """A secret split across three chunks at every pair of cut points is masked."""
    data = f"x{SECRET}y".encode()
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            chunks = [data[:first], data[first:second], data[second:]]
            assert _stream(StreamMasker([SECRET]), chunks) == b"x***y", (first, second)


def test_byte_by_byte_feeding_masks_everything() -> None:
    """Feeding one byte at a time masks secrets and every token shape."""
    text = f"{SECRET} {' '.join(TOKENS)} Authorization: Bearer abcdefgh12345\nend\n"
    chunks = [bytes([b]) for b in text.encode()]
    out = _stream(StreamMasker([SECRET]), chunks).decode()
    assert out == "*** *** *** *** *** *** Authorization: ***\nend\n"


@pytest.mark.parametrize("token", TOKENS)
def test_token_shape_split_at_every_position(token: str) -> None:
    """Each token shape is masked wherever the stream is split."""
    data = f"token is {token}; done\n".encode()
    for cut in range(len(data) + 1):
        out = _stream(StreamMasker([]), [data[:cut], data[cut:]])
        assert out == b"token is ***; done\n", (token, cut)


@pytest.mark.parametrize(
    ("line", "masked"),
    [
        ("Authorization: Bearer eyJhbGciOi.abc.def-x", "Authorization: ***"),
        ("curl -H 'authorization: Api-Token dt0c01.X.Y' x", "curl -H 'authorization: ***' x"),
        ("header Api-Token abcdefgh12345678 sent", "header Api-Token *** sent"),
        ("-H 'Bearer abcdefgh12345678'", "-H 'Bearer ***'"),
        ("GITHUB_TOKEN=abc123secret done", "GITHUB_TOKEN=*** done"),
        ('password="hunter2hunter"', 'password="***"'),
        ("db_password = hunter2 ok", "db_password = *** ok"),
        ("url?api_key=abcdef&x=1", "url?api_key=***&x=1"),
    ],
)
def test_header_and_assignment_values_are_masked(line: str, masked: str) -> None:
    """Header values and secret-looking assignments keep their key, lose their value."""
    assert mask_text(line, []) == masked


def test_ordinary_text_is_left_alone() -> None:
    """Prose that merely mentions tokens, bearers or authorization is not masked."""
    text = (
        "the bearer of bad news; token expired; Authorization failed\n"
        "ghp_short AKIA123 dt0c01.SHORT.X password: see vault\n"
    )
    assert mask_text(text, []) == text


def test_overlapping_and_prefix_secrets_are_masked_together() -> None:
    """Secrets that overlap or are prefixes of each other leave no part uncovered."""
    secrets = ["abcdef", "abcd", "cdefgh", "zzzz"]
    assert mask_text("xxabcdefghyy abcd-abcdefzzzzz", secrets) == "xx***yy ***-***"
    data = b"pre abcdefgh post\n"
    for cut in range(len(data) + 1):
        assert _stream(StreamMasker(secrets), [data[:cut], data[cut:]]) == b"pre *** post\n"


def test_repeated_overlapping_occurrences_of_one_secret() -> None:
    """A value that overlaps itself (aaaa in aaaaaa) is masked over its whole run."""
    assert mask_text("baaaaaab aaa", ["aaaa"]) == "b***b aaa"


def test_regex_metacharacters_in_secrets_are_literal() -> None:
    """Secrets are matched literally, metacharacters included."""
    secrets = ["a.b*c+(d)", r"[x]^$|\\", "?{2}"]
    text = r"a.b*c+(d) axbbc(d) [x]^$|\\ ?{2} ??"
    assert mask_text(text, secrets) == "*** axbbc(d) *** *** ??"


def test_multiline_secret_is_masked_line_by_line() -> None:
    """A configured secret with newlines is masked one line at a time."""
    secret = "first-line-secret\r\nsecond-line-secret\nab"
    out = mask_text("first-line-secret\r\nsecond-line-secret\nab cd\n", [secret])
    assert out == "***\r\n***\nab cd\n"


def test_short_secrets_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Values under 4 bytes are ignored with a warning; empty values are ignored quietly."""
    with caplog.at_level(logging.WARNING, logger="orbital.masking"):
        assert mask_text("abc and abcd", ["abc", "", "abcd"]) == "abc and ***"
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring a configured secret (or secret line) of 3 bytes: values shorter than 4 bytes "
        "are not masked"
    ]


def test_private_key_block_is_suppressed_across_chunks() -> None:
    """A private key block is replaced by one mask, whatever the chunking."""
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\nAAAABG5vbmU\n"
    key += "-----END OPENSSH PRIVATE KEY-----"
    data = f"start\n{key}\nafter\n".encode()
    for cut in range(len(data) + 1):
        out = _stream(StreamMasker([]), [data[:cut], data[cut:]])
        assert out == b"start\n***\nafter\n", cut
    single_line = "x='-----BEGIN RSA PRIVATE KEY-----\\nMIIE\\n-----END RSA PRIVATE KEY-----' y"
    assert mask_text(single_line, []) == "x='***' y"


def test_private_key_without_end_is_suppressed_until_the_bound() -> None:
    """A BEGIN line without END hides what follows, up to KEY_BLOCK_MAX, then output resumes."""
    masker = StreamMasker([])
    out = masker.feed(b"a\n-----BEGIN PRIVATE KEY-----\nsecretkeymaterial\n")
    assert out == b"a\n***"
    filler = b"k" * 1000 + b"\n"
    outs = [masker.feed(filler) for _ in range(masking.KEY_BLOCK_MAX // len(filler) + 2)]
    assert b"secretkeymaterial" not in b"".join(outs)
    assert masker.feed(b"visible again\n") == b"visible again\n"


def test_one_megabyte_line_is_masked_with_bounded_memory() -> None:
    """A 1 MB line without newline keeps held-back data under the bound and masks secrets."""
    masker = StreamMasker([SECRET])
    bound = max(masker.partial_line_max, 2 * masker.holdback)
    unit = ("x" * 997 + SECRET + " " + GITHUB_CLASSIC + "\t").encode()
    data = unit * (1024 * 1024 // len(unit) + 1)
    out = bytearray()
    for start in range(0, len(data), 4093):
        out += masker.feed(data[start : start + 4093])
        assert masker.held_bytes <= bound
    out += masker.flush()
    assert masker.held_bytes == 0
    expected = data.replace(SECRET.encode(), b"***").replace(GITHUB_CLASSIC.encode(), b"***")
    # A match that straddles two emitted pieces is masked in each: "******".
    assert re.sub(rb"(?:\*\*\*)+", b"***", bytes(out)) == expected


def test_one_megabyte_single_chunk_is_emitted_mostly_at_once() -> None:
    """One huge chunk without newline is emitted except for a bounded tail."""
    masker = StreamMasker([SECRET])
    data = (b"y" * 500_000) + SECRET.encode() + (b"z" * 500_000)
    out = masker.feed(data)
    assert masker.held_bytes <= masker.holdback * 2
    assert out + masker.flush() == data.replace(SECRET.encode(), b"***")
    assert len(out) > 900_000


def test_invalid_utf8_passes_through_unchanged() -> None:
    """Bytes that are not UTF-8 are not touched, and secrets next to them are masked."""
    data = (
        b"\xff\xfe" + SECRET.encode() + b"\x80\xc3(\x00\x1b[31m" + GITHUB_CLASSIC.encode() + b"\n"
    )
    for cut in range(len(data) + 1):
        out = _stream(StreamMasker([SECRET]), [data[:cut], data[cut:]])
        assert out == b"\xff\xfe***\x80\xc3(\x00\x1b[31m***\n"


def test_idle_flush_shows_prompts_but_holds_back_possible_secrets() -> None:
    """An idle flush emits a prompt, but keeps a tail that could still become a secret."""
    masker = StreamMasker([SECRET])
    assert masker.feed(b"Password: ") == b""
    assert masker.flush(final=False) == b"Password: "
    masker.feed(b"value is s3cr")
    assert masker.flush(final=False) == b"value is "
    masker.feed(b"3t-Value! ok Authorization: Bear")
    assert masker.flush(final=False) == b"*** ok Authorization: "
    masker.feed(b"er abcdefgh12345")
    # "Bearer " is masked as part of the header value, seen with the emitted text as context.
    assert masker.flush(final=False) == b"***"
    assert masker.feed(b"6789 done\n") == b"***\n"

    masker = StreamMasker([])
    masker.feed(b"key: -----BEGIN RSA PRIV")
    assert masker.flush(final=False) == b"key: "
    assert masker.feed(b"ATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n") == b"***\n"


def test_random_chunking_matches_one_shot_masking() -> None:
    """Any chunking of line-oriented output gives exactly the one-shot result, no leaks."""
    words = ["plain", "text", SECRET, *TOKENS, "Authorization: Bearer abcdefgh1234", "\n", "\n"]
    for _ in range(40):
        text = " ".join(RNG.choice(words) for _ in range(60)) + "\n"
        data = text.encode()
        cuts = sorted(RNG.sample(range(len(data)), 12))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        out = _stream(StreamMasker([SECRET]), chunks)
        assert out.decode() == mask_text(text, [SECRET])
        assert not any(secret.encode() in out for secret in [SECRET, *TOKENS])


def test_mask_text_round_trips_surrogates() -> None:
    """mask_text keeps surrogate-escaped bytes and lone surrogates intact."""
    text = b"ok \xff ".decode("utf-8", "surrogateescape") + "\ud800 " + SECRET
    assert mask_text(text, [SECRET]) == text.replace(SECRET, "***")


def test_every_pattern_is_bounded_by_max_token_bytes() -> None:
    """The hold-back arithmetic is sound: no pattern can match more than MAX_TOKEN_BYTES."""
    patterns = [p for _, p in masking._TOKEN_PATTERNS] + [masking._KEY_BEGIN, masking._KEY_END]
    for pattern in patterns:
        low, high = sre_parser.parse(pattern.pattern.decode("ascii")).getwidth()
        assert 0 < low <= high <= MAX_TOKEN_BYTES, pattern.pattern
        assert not pattern.search(b"\n"), "a pattern must never match a newline on its own"
        assert re.compile(pattern.pattern).flags == pattern.flags
