"""Webhook signatures: GitHub's ``X-Hub-Signature-256`` header, made and checked.

GitHub signs the exact bytes of the request body (JSON or form-encoded alike) with
HMAC-SHA256 under the hook's secret and sends ``sha256=<64 hex digits>``. The check
runs over the raw bytes as received, before anything is decoded, and compares
digests with :func:`hmac.compare_digest` so its time does not depend on how many
leading bytes match. Every way a header can be wrong (absent, repeated, not ASCII,
another scheme, wrong length, not hex, not matching) ends in the same exception
type; only the reason differs, and no reason contains the secret or the digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from orbital.errors import WebhookRejectedError

__all__ = ["SIGNATURE_HEADER", "sign", "verify_signature"]

SIGNATURE_HEADER = "X-Hub-Signature-256"

_PREFIX = "sha256="
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def sign(secret: bytes, body: bytes) -> str:
    """Return the ``X-Hub-Signature-256`` value GitHub would send for ``body``."""
    return _PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, headers: list[str]) -> None:
    """Check that ``headers`` (every ``X-Hub-Signature-256`` value the request carried)
    is exactly one valid signature of ``body`` under ``secret``.

    Raises:
        WebhookRejectedError: status 401, with a short reason, for a missing, repeated,
            malformed or non-matching signature.
        ValueError: if ``secret`` is empty (a programming error: the service refuses
            to start without one).
    """
    if not secret:
        raise ValueError("verify_signature: the webhook secret is empty")
    if not headers:
        raise WebhookRejectedError(401, f"missing {SIGNATURE_HEADER} header")
    if len(headers) > 1:
        raise WebhookRejectedError(401, f"{SIGNATURE_HEADER} header sent more than once")

    given = bytes.fromhex(_parse(headers[0]))
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, given):
        raise WebhookRejectedError(401, f"{SIGNATURE_HEADER} does not match the body")


def _parse(value: str) -> str:
    """Return the hex digest of a header value, or raise 401 saying what is wrong."""
    text = value.strip()
    if not text.isascii():
        raise WebhookRejectedError(401, f"{SIGNATURE_HEADER} is not ASCII")
    if not text.startswith(_PREFIX):
        raise WebhookRejectedError(401, f"{SIGNATURE_HEADER} must start with {_PREFIX!r}")
    digest = text[len(_PREFIX) :]
    if not _HEX_DIGEST.fullmatch(digest):
        raise WebhookRejectedError(401, f"{SIGNATURE_HEADER} must be {_PREFIX!r} and 64 hex digits")
    return digest
