"""X-Hub-Signature-256 checks and delivery decoding, without a server."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.parse

import pytest

from orbital.errors import WebhookRejectedError
from orbital.github.delivery import FORM_TYPE, JSON_TYPE, parse_delivery
from orbital.github.signature import sign, verify_signature

SECRET = b"It's a Secret to Everybody"
BODY = b"Hello, World!"


def test_sign_matches_githubs_documented_example() -> None:
    """sign() reproduces the example digest in GitHub's webhook documentation."""
    assert sign(SECRET, BODY) == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_valid_signature_passes_in_either_hex_case() -> None:
    """A correct signature is accepted, upper-case hex digits included."""
    good = sign(SECRET, BODY)
    verify_signature(SECRET, BODY, [good])
    verify_signature(SECRET, BODY, ["sha256=" + good.removeprefix("sha256=").upper()])


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ([], "missing"),
        ([sign(SECRET, BODY), sign(SECRET, BODY)], "more than once"),
        ([sign(b"other secret", BODY)], "does not match"),
        ([sign(SECRET, BODY + b"\n")], "does not match"),
        (["sha1=" + hmac.new(SECRET, BODY, hashlib.sha1).hexdigest()], "must start with"),
        (["sha256="], "64 hex digits"),
        (["sha256=" + "g" * 64], "64 hex digits"),
        ([sign(SECRET, BODY)[:-1]], "64 hex digits"),
        ([sign(SECRET, BODY) + "00"], "64 hex digits"),
        (["sha256=" + "é" * 64], "not ASCII"),
        (["sha256=\udcff" + "0" * 63], "not ASCII"),
        (["sha256=" + "\uff10" * 64], "not ASCII"),  # full-width digit zero
        ([""], "must start with"),
    ],
)
def test_bad_signature_headers_are_401_with_a_reason(values: list[str], reason: str) -> None:
    """Missing, repeated, wrong, malformed, non-hex and non-ASCII headers are all 401."""
    with pytest.raises(WebhookRejectedError, match=reason) as caught:
        verify_signature(SECRET, BODY, values)
    assert caught.value.status == 401
    assert SECRET.decode() not in caught.value.reason


def test_empty_secret_is_a_programming_error() -> None:
    """verify_signature refuses to run with an empty secret."""
    with pytest.raises(ValueError, match="secret is empty"):
        verify_signature(b"", BODY, [sign(b"x", BODY)])


def _parse(body: bytes, content_type: str = JSON_TYPE, **changes: object) -> object:
    args: dict[str, object] = {
        "secret": SECRET,
        "content_type": content_type,
        "signatures": [sign(SECRET, body)],
        "event": "issues",
        "delivery_id": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "body": body,
    }
    args.update(changes)
    return parse_delivery(**args)  # type: ignore[arg-type]


def test_json_and_form_deliveries_decode_to_the_same_payload() -> None:
    """A form-encoded delivery (payload=<JSON>), signed over the form body, decodes
    like the JSON one."""
    document = {"action": "opened", "issue": {"number": 1, "title": "a & b = c"}}
    as_json = json.dumps(document).encode()
    as_form = urllib.parse.urlencode({"payload": as_json.decode()}).encode()

    one = _parse(as_json, JSON_TYPE + "; charset=utf-8")
    two = _parse(as_form, FORM_TYPE)

    assert one == two
    assert getattr(one, "name", "") == "issues.opened"


def test_content_type_is_checked_before_the_signature() -> None:
    """An unsupported content type is 415 whatever the signature says."""
    with pytest.raises(WebhookRejectedError, match="unsupported content type") as caught:
        _parse(b"{}", "multipart/form-data; boundary=x", signatures=[])
    assert caught.value.status == 415


def test_signature_is_checked_before_the_body_is_decoded() -> None:
    """Unsigned junk is 401, not a JSON error: nothing is decoded before verification."""
    with pytest.raises(WebhookRejectedError) as caught:
        _parse(b"{not json", signatures=["sha256=" + "0" * 64])
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("body", "content_type", "changes", "reason"),
    [
        (b"{}", JSON_TYPE, {"event": None}, "missing X-GitHub-Event"),
        (b"{}", JSON_TYPE, {"event": "Issues;rm"}, "malformed X-GitHub-Event"),
        (b"{}", JSON_TYPE, {"delivery_id": ""}, "missing X-GitHub-Delivery"),
        (b"{}", JSON_TYPE, {"delivery_id": "a b"}, "malformed X-GitHub-Delivery"),
        (b'{"a": ', JSON_TYPE, {}, "malformed JSON at line 1"),
        (b"[]", JSON_TYPE, {}, "must be an object"),
        (b"\xff{}", JSON_TYPE, {}, "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, JSON_TYPE, {}, "JSON"),
        (b"payload=%7B&payload=%7D", FORM_TYPE, {}, "exactly one 'payload'"),
        (b"payload=%FF", FORM_TYPE, {}, "malformed form body"),
        (b"payload=\xff", FORM_TYPE, {}, "malformed form body"),
        (b'{"action": "opened\\nFAKE LOG LINE"}', JSON_TYPE, {}, "field action: malformed"),
        (b'{"action": 3}', JSON_TYPE, {}, "field action: malformed"),
    ],
)
def test_malformed_deliveries_are_400_with_a_short_reason(
    body: bytes, content_type: str, changes: dict[str, object], reason: str
) -> None:
    """Bad headers, JSON that is broken, not an object, not UTF-8 or too deep, and bad
    form bodies are 400 with a reason."""
    with pytest.raises(WebhookRejectedError, match=reason) as caught:
        _parse(body, content_type, **changes)
    assert caught.value.status == 400
    assert len(caught.value.reason) < 200
