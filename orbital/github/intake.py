"""Accepting a verified delivery: dedupe it, claim "once" subjects, enqueue its jobs.

Everything here is blocking Redis work (the HTTP service runs it in a thread pool).
Keys, under the installation's prefix:

* ``<prefix>:github:delivery:<id>`` marks an ``X-GitHub-Delivery`` id as accepted
  (SET NX with a TTL, so it holds across restarts and between replicas). While a
  delivery's jobs are being enqueued it holds a short-lived ``pending:`` token; if
  the receiver fails (or dies) half-way, the token is removed (or expires) and a
  redelivery is handled again. Job ids are derived from the delivery id, so the
  jobs that were already enqueued are not stored twice.
* ``<prefix>:github:once:<repo>:<subject>:<action>`` holds the id of the one job a
  "once" rule may start for that subject (an issue, a pull request, a commit). It is
  claimed with the same short TTL as a pending delivery and made to last
  (``webhook_once_ttl_s``) in the step that marks the delivery accepted, so a
  receiver dying half-way never leaves a subject claimed by a job that was not stored.

These keys belong to the GitHub receiver alone; the queue's keys are untouched
except through :meth:`orbital.queue.Queue.enqueue`.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from orbital.github.delivery import Delivery
from orbital.github.planner import FleetSource, Plan, PlannedJob, plan_delivery
from orbital.github.routing import RoutingTable
from orbital.keys import Keys
from orbital.queue import Queue
from orbital.settings import Settings

__all__ = ["Intake", "Outcome"]

logger = logging.getLogger(__name__)

#: How long a delivery stays claimed while its jobs are enqueued; a receiver that
#: died half-way blocks redeliveries of that id for at most this long.
PENDING_CLAIM_MS = 60_000

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Outcome:
    """The answer to a delivery: HTTP status and a small JSON body."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def job_ids(self) -> list[str]:
        return [str(j["id"]) for j in self.body.get("jobs", [])]


class Intake:
    """Plans deliveries and records them in Redis.

    Args:
        client: a blocking Redis client (thread-safe; shared by the pool's threads).
        settings: the installation's settings (prefix, TTLs, job defaults).
        table: the routing table.
        fleet: where the fleet registry comes from.
    """

    def __init__(
        self, client: redis.Redis, settings: Settings, table: RoutingTable, fleet: FleetSource
    ) -> None:
        self.client = client
        self.settings = settings
        self.table = table
        self.fleet = fleet
        self.queue = Queue(client, settings)
        self._keys = Keys(settings.prefix)
        self._release = client.register_script(_RELEASE)

    def delivery_key(self, delivery_id: str) -> str:
        return self._keys.webhook_delivery(delivery_id)

    def once_key(self, subject_key: str) -> str:
        return self._keys.webhook_once(subject_key)

    def handle(self, delivery: Delivery) -> Outcome:
        """Plan ``delivery`` and, unless its id was already accepted, enqueue its jobs.

        Raises:
            WebhookRejectedError: 422 for an invalid identifier in the payload
                (nothing is recorded then).
            redis.RedisError: when Redis fails; the delivery is left unclaimed so a
                redelivery is handled again.
        """
        plan = plan_delivery(delivery, self.table, self.fleet.get(), self.settings)
        if not plan.jobs:
            return self._answer_without_jobs(plan)

        key = self.delivery_key(delivery.delivery_id)
        token = f"pending:{uuid.uuid4().hex}"
        if not self.client.set(key, token, nx=True, px=PENDING_CLAIM_MS):
            return self._duplicate(delivery)
        jobs: list[dict[str, str]] = []
        notes = list(plan.notes)
        claims: list[tuple[str, str]] = []
        try:
            for planned in plan.jobs:
                result = self._enqueue(planned, claims)
                if isinstance(result, dict):
                    jobs.append(result)
                else:
                    notes.append(result)
            self._confirm(key, claims)
        except redis.RedisError:
            self._release_claims([(key, token), *claims])
            raise

        logger.info(
            "delivery %s (%s): enqueued %d job(s)%s%s",
            delivery.delivery_id, delivery.name, len(jobs),
            "".join(f"; {j['id']} {j['what']} ({j['outcome']})" for j in jobs),
            "".join(f"; {n}" for n in notes),
        )  # fmt: skip
        return Outcome(202, {"status": "accepted", "jobs": jobs, "notes": notes})

    def _answer_without_jobs(self, plan: Plan) -> Outcome:
        """Pings and ignored deliveries: one SET NX records them as accepted."""
        delivery = plan.delivery
        key = self.delivery_key(delivery.delivery_id)
        ttl = int(self.settings.webhook_dedupe_ttl_s)
        if not self.client.set(key, "accepted", nx=True, ex=ttl):
            return self._duplicate(delivery)
        if plan.pong:
            logger.info("delivery %s: ping for %s; answered pong", delivery.delivery_id,
                        _hook_owner(delivery.payload))  # fmt: skip
            return Outcome(200, {"status": "pong"})
        logger.info("delivery %s (%s): ignored: %s", delivery.delivery_id, delivery.name,
                    plan.ignored)  # fmt: skip
        return Outcome(202, {"status": "ignored", "reason": plan.ignored})

    def _enqueue(self, planned: PlannedJob, claims: list[tuple[str, str]]) -> dict[str, str] | str:
        """Enqueue one job and describe it; or say why not, when its "once" subject
        already has another job. A new "once" claim is added to ``claims``: it holds
        for :data:`PENDING_CLAIM_MS` until :meth:`_confirm` makes it last."""
        job = planned.job
        if planned.once_key:
            key = self.once_key(planned.once_key)
            if self.client.set(key, job.id, nx=True, px=PENDING_CLAIM_MS):
                claims.append((key, job.id))
            else:
                raw: bytes | None = self.client.get(key)  # type: ignore[assignment]
                holder = raw.decode() if raw is not None else "one that has since expired"
                if holder != job.id:
                    return f"{planned.what}: already started once (job {holder}); not again"
                # This delivery claimed it in an attempt that failed half-way: go on.
                claims.append((key, job.id))
        result = self.queue.enqueue(job)
        return {"id": job.id, "what": planned.what, "outcome": result.outcome}

    def _confirm(self, key: str, claims: list[tuple[str, str]]) -> None:
        """Mark the delivery accepted and make its "once" claims last, in one round trip."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(key, "accepted", ex=int(self.settings.webhook_dedupe_ttl_s))
        for once_key, _ in claims:
            pipe.expire(once_key, int(self.settings.webhook_once_ttl_s))
        pipe.execute()

    def _duplicate(self, delivery: Delivery) -> Outcome:
        logger.info("delivery %s (%s): already accepted; ignored as a duplicate",
                    delivery.delivery_id, delivery.name)  # fmt: skip
        return Outcome(200, {"status": "duplicate delivery"})

    def _release_claims(self, claims: list[tuple[str, str]]) -> None:
        """Best effort after a failure: drop the claims this attempt still holds, so a
        redelivery (or a later event for the same subject) is handled. Claims that
        cannot be dropped expire after PENDING_CLAIM_MS."""
        for key, value in claims:
            try:
                self._release(keys=[key], args=[value])
            except redis.RedisError as err:
                logger.warning("key %s: could not release the claim (%s); it expires in %d s",
                               key, err, PENDING_CLAIM_MS // 1000)  # fmt: skip
                return


def _hook_owner(payload: dict[str, Any]) -> str:
    """Who a ping's hook belongs to: a repository, an organisation or an app."""
    for field_name, key in (("repository", "full_name"), ("organization", "login")):
        value = payload.get(field_name)
        if isinstance(value, dict) and isinstance(value.get(key), str):
            return f"{field_name} {value[key][:100]!r}"
    hook = payload.get("hook")
    if isinstance(hook, dict) and hook.get("app_id") is not None:
        return f"app {str(hook.get('app_id'))[:20]}"
    return "an unknown owner"
