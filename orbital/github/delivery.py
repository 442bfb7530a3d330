"""One webhook delivery as received: checked, verified and decoded.

:func:`parse_delivery` turns the parts of an HTTP request into a :class:`Delivery`
or refuses it with the status the receiver should answer:

* 415 for a content type other than JSON or GitHub's form encoding;
* 401 for a signature that is missing, malformed or wrong (checked over the raw
  body, before anything is decoded);
* 400 for missing or malformed ``X-GitHub-Event`` / ``X-GitHub-Delivery`` headers,
  a body that is not UTF-8 JSON, a JSON document that is not an object, or an
  ``action`` that is not a lower-case word (it is logged and routed on).

Form-encoded deliveries are accepted: GitHub then sends ``payload=<JSON>`` with
the signature computed over the raw form body, which is what gets verified.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from orbital.errors import WebhookRejectedError
from orbital.github.signature import verify_signature

__all__ = ["FORM_TYPE", "JSON_TYPE", "Delivery", "parse_delivery"]

JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"

_EVENT = re.compile(r"[a-z0-9_]{1,64}")
_ACTION = _EVENT  # GitHub's actions are lower-case words joined by underscores
_DELIVERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UTF8 = ("utf-8", "utf8")


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: the event name, GitHub's delivery id and the payload."""

    event: str
    delivery_id: str
    payload: dict[str, Any]

    @property
    def action(self) -> str:
        """The payload's ``action`` (empty for events without one, such as push)."""
        action = self.payload.get("action")
        return action if isinstance(action, str) else ""

    @property
    def name(self) -> str:
        """``event.action`` (or just ``event``) for log lines and reasons."""
        return f"{self.event}.{self.action}" if self.action else self.event


def parse_delivery(
    *,
    secret: bytes,
    content_type: str,
    signatures: list[str],
    event: str | None,
    delivery_id: str | None,
    body: bytes,
) -> Delivery:
    """Check the content type, verify the signature over ``body``, then decode it.

    ``signatures`` holds every ``X-Hub-Signature-256`` value the request carried;
    ``event`` and ``delivery_id`` are the ``X-GitHub-Event`` and
    ``X-GitHub-Delivery`` headers (None when absent).

    Raises:
        WebhookRejectedError: 415, 401 or 400 as described in the module docstring.
    """
    mime = _media_type(content_type)
    verify_signature(secret, body, signatures)
    event = _header("X-GitHub-Event", event, _EVENT)
    delivery_id = _header("X-GitHub-Delivery", delivery_id, _DELIVERY_ID)

    document = _form_payload(body) if mime == FORM_TYPE else body
    payload = _json_object(document)
    action = payload.get("action")
    if action is not None and not (isinstance(action, str) and _ACTION.fullmatch(action)):
        raise WebhookRejectedError(400, f"field action: malformed {str(action)[:40]!r}")
    return Delivery(event=event, delivery_id=delivery_id, payload=payload)


def _media_type(content_type: str) -> str:
    """The media type, lower case, if it is one Orbital decodes; 415 otherwise."""
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime not in (JSON_TYPE, FORM_TYPE):
        shown = mime[:60] or "none"
        raise WebhookRejectedError(
            415, f"unsupported content type {shown!r}: expected {JSON_TYPE} or {FORM_TYPE}"
        )
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in _UTF8:
            raise WebhookRejectedError(415, "unsupported charset: webhook bodies must be UTF-8")
    return mime


def _header(name: str, value: str | None, pattern: re.Pattern[str]) -> str:
    if value is None or not value.strip():
        raise WebhookRejectedError(400, f"missing {name} header")
    value = value.strip()
    if not pattern.fullmatch(value):
        raise WebhookRejectedError(400, f"malformed {name} header {value[:60]!r}")
    return value


def _form_payload(body: bytes) -> bytes:
    """The JSON document in a form-encoded body's single ``payload`` field."""
    try:
        fields = urllib.parse.parse_qs(
            body.decode("ascii"), strict_parsing=True, max_num_fields=8, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise WebhookRejectedError(400, "malformed form body") from None
    values = fields.get("payload", [])
    if len(values) != 1:
        raise WebhookRejectedError(400, "form body must carry exactly one 'payload' field")
    return values[0].encode("utf-8")


def _json_object(document: bytes) -> dict[str, Any]:
    try:
        data = json.loads(document.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise WebhookRejectedError(400, f"body is not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise WebhookRejectedError(
            400, f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise WebhookRejectedError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise WebhookRejectedError(400, f"JSON body must be an object, not {type(data).__name__}")
    return data
