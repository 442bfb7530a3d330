"""GitHub: webhooks in (verification, routing to jobs, the receiver) and the small
REST client used to comment on issues and pull requests.

The receiver itself (:mod:`orbital.github.app`) needs the ``webhook`` extra
(aiohttp); everything re-exported here works without it.
"""

from __future__ import annotations

from orbital.github.delivery import Delivery, parse_delivery
from orbital.github.intake import Intake, Outcome
from orbital.github.planner import FleetSource, Plan, PlannedJob, plan_delivery
from orbital.github.rest import Comment, GitHubClient
from orbital.github.routing import (
    DEFAULT_TABLE,
    Facts,
    JobSpec,
    RoutingTable,
    Rule,
    load_routing_table,
    parse_routing_table,
)
from orbital.github.signature import SIGNATURE_HEADER, sign, verify_signature

__all__ = [
    "DEFAULT_TABLE",
    "SIGNATURE_HEADER",
    "Comment",
    "Delivery",
    "Facts",
    "FleetSource",
    "GitHubClient",
    "Intake",
    "JobSpec",
    "Outcome",
    "Plan",
    "PlannedJob",
    "RoutingTable",
    "Rule",
    "load_routing_table",
    "parse_delivery",
    "parse_routing_table",
    "plan_delivery",
    "sign",
    "verify_signature",
]
