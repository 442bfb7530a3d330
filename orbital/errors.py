"""Every exception Orbital raises, in one tree.

OrbitalError
├── ConfigError            configuration or settings are unusable
├── EventError             an event is not a CloudEvent the outbox can take
├── FleetError             repos.yaml cannot be loaded or fails validation
├── GitHubApiError         the GitHub REST API refused a request or did not answer
├── InvalidIdentifierError a repository, branch, commit or job id is refused
├── JobError
│   ├── UnknownJobError    no job with that id exists
│   ├── JobStateError      the job is in a state that forbids the action
│   ├── JobParamsError     a job's parameters are missing or invalid
│   └── LeaseLostError     a worker no longer holds the job it is running
├── LogError
│   ├── UnknownLogError    no log was ever recorded for that job
│   └── LogExpiredError    the live log expired and no archive is left
├── SandboxError           a sandbox could not be started, used or removed
└── WebhookRejectedError   a GitHub webhook delivery is refused (with its HTTP status)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EventError",
    "FleetError",
    "GitHubApiError",
    "InvalidIdentifierError",
    "JobError",
    "JobParamsError",
    "JobStateError",
    "LeaseLostError",
    "LogError",
    "LogExpiredError",
    "OrbitalError",
    "SandboxError",
    "UnknownJobError",
    "UnknownLogError",
    "WebhookRejectedError",
]


class OrbitalError(Exception):
    """Base class of every error Orbital raises on purpose."""


class ConfigError(OrbitalError):
    """Raised when a setting is missing or has a value Orbital cannot use."""


class EventError(OrbitalError, ValueError):
    """Raised when an event handed to the outbox lacks a required CloudEvents
    attribute (``specversion``, ``id``, ``source``, ``type``) or has data that is not
    a JSON object. The message names the attribute and the event id."""


class FleetError(OrbitalError):
    """Raised when the fleet registry cannot be read or an entry is invalid.

    The message names the file, the entry and the field.
    """


class GitHubApiError(OrbitalError):
    """Raised when the GitHub REST API answers a request with an error status, or
    cannot be reached. ``status`` is the HTTP status (0 when there was no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class InvalidIdentifierError(OrbitalError, ValueError):
    """Raised when an identifier from outside (repository, branch, commit, job id)
    does not match the strict pattern Orbital accepts."""


class JobError(OrbitalError):
    """Base class for errors about one job."""


class UnknownJobError(JobError, KeyError):
    """Raised when no job with the given id exists in Redis."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown job"


class JobParamsError(JobError, ValueError):
    """Raised when a job's ``params`` lack a value its handler needs, or carry one it
    refuses (an unknown agent action, a runbook name outside ``runbooks/``)."""


class JobStateError(JobError):
    """Raised when a job's current state forbids the requested action."""


class LeaseLostError(JobError):
    """Raised inside a worker when the lease on a running job was lost
    (it expired and the job was handed to another worker, or it was cancelled)."""


class LogError(OrbitalError):
    """Base class for errors reading a job's log."""


class UnknownLogError(LogError):
    """Raised when no log was ever recorded for the job id."""


class LogExpiredError(LogError):
    """Raised when the job's live log expired from Redis and no archive exists."""


class SandboxError(OrbitalError):
    """Raised when a sandbox cannot be started, used, reset or removed."""


class WebhookRejectedError(OrbitalError):
    """Raised when a GitHub webhook delivery is refused: bad signature, unsupported
    content type, oversize or malformed body, or a payload field that breaks its rule.

    ``status`` is the HTTP status to answer with and the message is the short reason
    sent back to GitHub (it never contains a secret).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
