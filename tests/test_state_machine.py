"""Random interleavings of the daemon's real SQL against the real schema (hypothesis stateful).

Two daemon instances claim, mark, write outcomes, lose their leases, adopt each other's work and
restart, while an operator cancels, pauses and resumes campaigns and tops up credits, and an
application applies delivery reports. Every statement is the daemon's own (imported, not
copied), run through asyncpg. After every step the invariants of the Database contract are
checked against a fresh snapshot of the rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from harness import ALLOWED, STATUSES
from parts import account, claim_config, make_parts
from sendd.actors.express import claim_express
from sendd.actors.poller import Claimer, claim_due
from sendd.actors.writer import write_results
from sendd.commands import campaigns, tenants
from sendd.core.ratelimit import Governor
from sendd.db import leases, migrate
from sendd.db.claims import MARK_SUBMITTED, TENANT_BUDGETS
from sendd.errors import UserError
from sendd.model import FAILED, RELEASE, RETRY, SENT, UNKNOWN, BatchResult, Message, Outcome

ILLEGAL = sorted((a, b) for a in STATUSES for b in STATUSES if a != b and (a, b) not in ALLOWED)
ACCEPTED = {"sent", "delivered", "undelivered"}
FINAL = ACCEPTED | {"failed", "unknown", "cancelled"}
IN_FLIGHT = {"sending", "unknown"}
TENANTS = ("acme", "beta")
ACCOUNTS = ("main", "alt")
LEASE_SECONDS = 60.0
OUTCOMES = (SENT, FAILED, RETRY, RELEASE, UNKNOWN)

TABLES = ("sendd.submission", "sendd.credit_ledger", "sendd.message", "sendd.campaign",
          "sendd.instance", "sendd.tenant")


@dataclass
class Slot:
    """One daemon process (restarts get a new instance id) and what it holds in memory."""

    name: str
    instance_id: str = ""
    generation: int = 0
    unsubmitted: dict[int, Message] = field(default_factory=dict)  # claimed, not marked
    marks: dict[int, list[Message]] = field(default_factory=dict)  # open submission marks

    def claimer(self, chunk: int, paused: set[str], max_batch: int = 1000,
                timeout: float = 1.0) -> Claimer:
        config = claim_config([account(a, max_batch=max_batch, timeout=timeout)
                               for a in ACCOUNTS], chunk=chunk)
        governor = Governor(clock=lambda: 0.0)
        for name in ACCOUNTS:
            governor.set_account(name, 0, 0)
        claimer = make_parts(config, instance_id=self.instance_id, governor=governor).claimer()
        claimer.controls.paused_tenants = set(paused)
        return claimer


segment_lists = st.lists(st.integers(1, 3), min_size=2, max_size=8)


class SendStateMachine(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    conn: asyncpg.Connection

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # --- Setup -------------------------------------------------------------------------------

    @initialize(
        credits=st.tuples(st.integers(2, 14), st.integers(0, 14)),
        c1=segment_lists, c2=segment_lists,
        tx=st.lists(st.tuples(st.sampled_from(TENANTS), st.integers(1, 3), st.integers(0, 2)),
                    max_size=4),
        accounts=st.lists(st.sampled_from(ACCOUNTS), min_size=20, max_size=20),
    )
    def setup(self, credits, c1, c2, tx, accounts) -> None:
        self.slots = {name: Slot(name) for name in ("A", "B")}
        self.initial = dict(zip(TENANTS, credits, strict=True))
        self.submitted: set[int] = set()  # messages a provider may have seen (marked)
        self.previous: dict[int, str] | None = None

        async def setup() -> None:
            conn = self.conn
            await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
            for tenant, amount in self.initial.items():
                await conn.execute("INSERT INTO sendd.tenant (id, credits) VALUES ($1, $2)",
                                   tenant, amount)
            self.campaigns = []
            for tenant in TENANTS:
                self.campaigns.append(await conn.fetchval(
                    "INSERT INTO sendd.campaign (tenant_id, status, started_at) "
                    "VALUES ($1, 'sending', now()) RETURNING id", tenant))
            rows = [(TENANTS[0], self.campaigns[0], s, 0) for s in c1]
            rows += [(TENANTS[1], self.campaigns[1], s, 0) for s in c2]
            rows += [(t, None, s, p) for t, s, p in tx]
            await conn.executemany(
                "INSERT INTO sendd.message (tenant_id, campaign_id, account, recipient, body, "
                "segments, priority, next_attempt_at) "
                "VALUES ($1, $2, $3, $4, 'hi', $5, $6, now() - interval '1 second')",
                [(t, c, accounts[i], f"+3069{i:08d}", s, p)
                 for i, (t, c, s, p) in enumerate(rows)])
            for slot in self.slots.values():
                await self.start(slot)

        self.run(setup())

    async def start(self, slot: Slot) -> None:
        slot.generation += 1
        slot.instance_id = f"{slot.name}{slot.generation}"
        slot.unsubmitted.clear()
        slot.marks.clear()
        await leases.register(self.conn, slot.instance_id, LEASE_SECONDS)

    def slot(self, data: st.DataObject, holding: str = "") -> Slot:
        """A slot, among those holding claims or marks in memory when `holding` names them."""
        names = sorted(n for n, s in self.slots.items() if not holding or getattr(s, holding))
        return self.slots[data.draw(st.sampled_from(names), label="slot")]

    def holding(self, what: str) -> bool:
        return hasattr(self, "slots") and any(getattr(s, what) for s in self.slots.values())

    # --- The daemons' statements -------------------------------------------------------------

    @rule(data=st.data())
    def step(self, data) -> None:
        """One statement of a daemon, a reaper, an operator or an application.

        One rule with many actions: hypothesis's swarm testing switches whole rules off for an
        example, and what is worth finding needs daemons, leases and operators in one run. It
        favours the first choices, so those that put work in flight come first.
        """
        actions = ["mark_submitted"] if self.holding("unsubmitted") else []
        actions += ["claim", "claim_express", "lease_lost_and_adopted"]
        if self.holding("marks"):
            actions += ["write_mark_outcomes"]
        if self.holding("unsubmitted"):
            actions += ["write_unmarked_outcomes"]
        actions += ["cancel", "delivery_report", "release_unsubmitted", "crash", "stop",
                    "pause", "resume", "illegal_transition", "expire_lease", "adopt_expired",
                    "renew_lease", "change_credits"]
        getattr(self, data.draw(st.sampled_from(actions), label="action"))(data)

    def claim(self, data) -> None:
        slot = self.slot(data)
        chunk = data.draw(st.integers(1, 8), label="chunk")
        paused = data.draw(st.sets(st.sampled_from(TENANTS), max_size=1), label="paused")

        async def claim() -> None:
            budgets, queued = await self.budgets_and_queued()
            result = await claim_due(self.conn, slot.claimer(chunk, paused))
            assert all(m.campaign_id is not None for m in result.messages)
            self.check_claimed(result.messages, queued, budgets, paused)
            slot.unsubmitted.update((m.id, m) for m in result.messages)

        self.run(claim())

    def claim_express(self, data) -> None:
        """The express lane's claim, which writes the batches' marks when the lease outlives the
        request timeout by the margin (else the sender marks them)."""
        slot = self.slot(data)
        chunk = data.draw(st.integers(1, 8), label="chunk")
        paused = data.draw(st.sets(st.sampled_from(TENANTS), max_size=1), label="paused")
        max_batch = data.draw(st.integers(1, 3), label="max_batch")
        timeout = data.draw(st.sampled_from([1.0, 2 * LEASE_SECONDS]), label="timeout")

        async def claim() -> None:
            budgets, queued = await self.budgets_and_queued()
            claimer = slot.claimer(chunk, paused, max_batch, timeout)
            batches = await claim_express(self.conn, claimer)
            messages = [m for b in batches for m in b.messages]
            assert all(m.campaign_id is None for m in messages)
            self.check_claimed(messages, queued, budgets, paused)
            for batch in batches:
                assert 1 <= len(batch.messages) <= max_batch
                assert {(m.account, m.tenant_id) for m in batch.messages} == {
                    (batch.account, batch.tenant_id)}
                if batch.submission_id is None:
                    slot.unsubmitted.update((m.id, m) for m in batch.messages)
                    continue
                assert timeout < LEASE_SECONDS, "marked although the lease ends first"
                slot.marks[batch.submission_id] = batch.messages
                self.submitted.update(m.id for m in batch.messages)

        self.run(claim())

    async def budgets_and_queued(self) -> tuple[dict[str, int], set[int]]:
        budgets = {r["id"]: r["budget"] for r in await self.conn.fetch(
            TENANT_BUDGETS, list(TENANTS))}
        queued = {r["id"] for r in await self.conn.fetch(
            "SELECT id FROM sendd.message WHERE status = 'queued'")}
        return budgets, queued

    @staticmethod
    def check_claimed(messages: list[Message], queued: set[int], budgets: dict[str, int],
                      paused: set[str]) -> None:
        taken: dict[str, int] = {}
        for message in messages:
            assert message.id in queued, f"claimed {message.id}, which was not queued"
            assert message.tenant_id not in paused, "claimed for a paused tenant"
            taken[message.tenant_id] = taken.get(message.tenant_id, 0) + message.segments
        # (f) a claim never takes more than credits minus what is in flight.
        for tenant, segments in taken.items():
            assert segments <= budgets[tenant], (tenant, segments, budgets[tenant])

    def mark_submitted(self, data) -> None:
        slot = self.slot(data, "unsubmitted")
        margin = data.draw(st.sampled_from([0.0, 1.0]), label="margin")
        first = data.draw(st.sampled_from(sorted(slot.unsubmitted)), label="batch of")
        group = sorted(i for i, m in slot.unsubmitted.items()
                       if (m.account, m.tenant_id) == (slot.unsubmitted[first].account,
                                                       slot.unsubmitted[first].tenant_id))
        ids = data.draw(st.lists(st.sampled_from(group), min_size=1, unique=True), label="ids")
        account = slot.unsubmitted[first].account
        campaigns = sorted({m.campaign_id for i, m in slot.unsubmitted.items() if i in ids
                            and m.campaign_id is not None})
        mark = self.run(self.conn.fetchval(MARK_SUBMITTED, slot.instance_id, account, ids,
                                           margin, campaigns))
        if mark is None:
            return  # lease gone: the sender would raise LeaseLost and not send
        slot.marks[mark] = [slot.unsubmitted.pop(i) for i in ids]
        self.submitted.update(ids)

    def write_mark_outcomes(self, data) -> None:
        """A provider answered a marked batch: every message's outcome and the mark, at once."""
        slot = self.slot(data, "marks")
        mark = data.draw(st.sampled_from(sorted(slot.marks)), label="mark")
        messages = slot.marks.pop(mark)
        outcomes = [Outcome(m, data.draw(st.sampled_from(OUTCOMES), label="outcome"),
                            retry_in=data.draw(st.sampled_from([0.0, 0.0, 3600.0])))
                    for m in messages]
        self.run(write_results(self.conn, slot.instance_id, [BatchResult(mark, outcomes)]))

    def write_unmarked_outcomes(self, data) -> None:
        slot = self.slot(data, "unsubmitted")
        ids = data.draw(st.lists(st.sampled_from(sorted(slot.unsubmitted)), min_size=1,
                                 unique=True), label="ids")
        outcomes = [Outcome(slot.unsubmitted.pop(i),
                            data.draw(st.sampled_from(OUTCOMES), label="outcome"))
                    for i in ids]
        self.run(write_results(self.conn, slot.instance_id, [BatchResult(None, outcomes)]))

    def expire_lease(self, data) -> None:
        ids = sorted(r["id"] for r in self.run(self.conn.fetch("SELECT id FROM sendd.instance")))
        if not ids:
            return
        dead = data.draw(st.sampled_from(ids), label="expire")
        self.run(self.conn.execute(
            "UPDATE sendd.instance SET lease_until = now() - interval '1 second' WHERE id = $1",
            dead))

    def lease_lost_and_adopted(self, data) -> None:
        """One daemon stalls past its lease; the other's reaper adopts its work. The stalled
        process keeps its memory (a zombie) until it restarts."""
        dead = self.slot(data, "marks" if self.holding("marks") else "")
        reaper = next(s for s in self.slots.values() if s is not dead)
        self.run(self.conn.execute(
            "UPDATE sendd.instance SET lease_until = now() - interval '1 second' WHERE id = $1",
            dead.instance_id))
        self.adopt(reaper)

    def renew_lease(self, data) -> None:
        slot = self.slot(data)
        self.run(leases.renew(self.conn, slot.instance_id, LEASE_SECONDS))

    def adopt_expired(self, data) -> None:
        self.adopt(self.slot(data))

    def stop(self, data) -> None:
        self.restart(data, clean=True)

    def crash(self, data) -> None:
        self.restart(data, clean=False)

    def adopt(self, slot: Slot) -> None:
        async def adopt() -> None:
            if await leases.adopt_expired(self.conn, slot.instance_id) is None:
                return
            for mark in await leases.adopted_marks(self.conn, slot.instance_id, set(slot.marks)):
                rows = await leases.messages_of_mark(self.conn, mark["message_ids"],
                                                     slot.instance_id)
                slot.marks[mark["id"]] = [Message(*row) for row in rows]

        self.run(adopt())

    def release_unsubmitted(self, data) -> None:
        slot = self.slot(data)
        self.run(leases.release_unsubmitted(self.conn, slot.instance_id))
        slot.unsubmitted.clear()  # released: the pipeline no longer holds them

    def restart(self, data, clean: bool) -> None:
        """A stop (clean: leases.finish) or a crash, and a new process with a new instance id."""
        slot = self.slot(data)

        async def restart() -> None:
            if clean:
                await leases.finish(self.conn, slot.instance_id)
            await self.start(slot)

        self.run(restart())

    # --- Operators and applications ----------------------------------------------------------

    def operate_campaign(self, data, action: str) -> None:
        campaign = data.draw(st.sampled_from(self.campaigns), label="campaign")
        try:
            self.run(getattr(campaigns, action)(self.conn, campaign))
        except UserError:
            pass  # not in a state that allows it

    def cancel(self, data) -> None:
        self.operate_campaign(data, "cancel")

    def pause(self, data) -> None:
        self.operate_campaign(data, "pause")

    def resume(self, data) -> None:
        self.operate_campaign(data, "resume")

    def change_credits(self, data) -> None:
        tenant = data.draw(st.sampled_from(TENANTS), label="tenant")
        amount = data.draw(st.integers(1, 5), label="amount")
        change = ({"credits": amount} if data.draw(st.booleans(), label="absolute")
                  else {"add_credits": amount})
        try:
            self.run(tenants.set_tenant(self.conn, tenant, **change))
        except UserError:
            pass  # below what is in flight

    def delivery_report(self, data) -> None:
        rows = self.run(self.conn.fetch(
            "SELECT id FROM sendd.message WHERE status IN ('sent', 'unknown') ORDER BY id"))
        if not rows:
            return
        message = data.draw(st.sampled_from([r["id"] for r in rows]), label="dlr for")
        to = data.draw(st.sampled_from(["delivered", "undelivered"]), label="dlr")
        status = self.run(self.conn.execute(
            """UPDATE sendd.message m SET status = $2, finished_at = now()
               WHERE id = $1 AND sendd.transition_allowed(m.status, $2)""", message, to))
        assert status == "UPDATE 1"

    def illegal_transition(self, data) -> None:
        old, new = data.draw(st.sampled_from(ILLEGAL), label="illegal")
        status = self.run(self.conn.execute(
            """UPDATE sendd.message m SET status = $2
               WHERE status = $1 AND sendd.transition_allowed(m.status, $2)""", old, new))
        assert status == "UPDATE 0", (old, new, status)

    # --- Invariants --------------------------------------------------------------------------

    @invariant()
    def contract_holds(self) -> None:
        if not hasattr(self, "slots"):
            return
        self.run(self.check())

    async def check(self) -> None:
        conn = self.conn
        messages = await conn.fetch("SELECT * FROM sendd.message ORDER BY id")
        now = {m["id"]: m["status"] for m in messages}

        # (a) every status change since the last step is allowed, by the list and by SQL.
        if self.previous is not None:
            changes = sorted({(self.previous[i], s) for i, s in now.items()
                              if s != self.previous[i]})
            for change in changes:
                assert change in ALLOWED, f"illegal transition {change}"
            if changes:
                verdicts = await conn.fetch(
                    "SELECT sendd.transition_allowed(a, b) AS ok "
                    "FROM unnest($1::text[], $2::text[]) AS p(a, b)",
                    [a for a, _ in changes], [b for _, b in changes])
                assert all(r["ok"] for r in verdicts), changes
        self.previous = now

        # (b) counters equal counts over the rows; (d) completion.
        for c in await conn.fetch("SELECT * FROM sendd.campaign ORDER BY id"):
            rows = [m["status"] for m in messages if m["campaign_id"] == c["id"]]
            expected = {
                "total": len(rows),
                "sent": sum(s in ACCEPTED for s in rows),
                "failed": rows.count("failed"), "delivered": rows.count("delivered"),
                "undelivered": rows.count("undelivered"), "unknown": rows.count("unknown"),
                "cancelled": rows.count("cancelled"),
            }
            actual = {k: c[k] for k in expected}
            assert actual == expected, (c["id"], actual, expected)
            all_final = all(s in FINAL for s in rows)
            if c["status"] == "completed":
                assert all_final, (c["id"], "completed with unfinished messages", rows)
            if c["status"] in ("sending", "paused"):
                assert not all_final, (c["id"], c["status"], "every message is final", rows)

        # (c) credits: never negative, every change in the ledger, debits = accepted segments.
        for t in await conn.fetch("SELECT id, credits FROM sendd.tenant ORDER BY id"):
            tenant = t["id"]
            assert t["credits"] >= 0
            ledger = await conn.fetch(
                "SELECT delta, reason FROM sendd.credit_ledger WHERE tenant_id = $1", tenant)
            assert t["credits"] == self.initial[tenant] + sum(r["delta"] for r in ledger)
            debits = -sum(r["delta"] for r in ledger if r["reason"] == "send")
            accepted = sum(m["segments"] for m in messages
                           if m["tenant_id"] == tenant and m["status"] in ACCEPTED)
            assert debits == accepted, (tenant, debits, accepted)
            in_flight = sum(m["segments"] for m in messages
                            if m["tenant_id"] == tenant and m["status"] in IN_FLIGHT)
            assert t["credits"] >= in_flight, (tenant, t["credits"], in_flight)
            counted = await conn.fetchval("SELECT sendd.in_flight_segments($1)", tenant)
            assert counted == in_flight, (tenant, "in-flight counter", counted, in_flight)

        # (e) every message being sent is leased to a registered instance, and only those.
        instances = {r["id"] for r in await conn.fetch("SELECT id FROM sendd.instance")}
        marks = await conn.fetch("SELECT instance_id, message_ids FROM sendd.submission")
        marked = {(i, r["instance_id"]) for r in marks for i in r["message_ids"]}
        for m in messages:
            if m["status"] == "sending":
                assert m["lease_owner"] is not None, m["id"]
                assert m["lease_owner"] in instances, (m["id"], m["lease_owner"], "orphaned")
                # (g) a message that may have reached a provider keeps its durable mark.
                if m["id"] in self.submitted:
                    assert (m["id"], m["lease_owner"]) in marked, (m["id"], "lost its mark")
            else:
                assert m["lease_owner"] is None, (m["id"], m["status"], m["lease_owner"])
                self.submitted.discard(m["id"])

        # A cancelled campaign's messages that never reached a provider are cancelled too.
        for c in await conn.fetch("SELECT id FROM sendd.campaign WHERE status = 'cancelled'"):
            stuck = [m["id"] for m in messages
                     if m["campaign_id"] == c["id"] and m["status"] == "queued"]
            assert not stuck, (c["id"], "queued messages in a cancelled campaign", stuck)


@contextmanager
def connected(database_url: str) -> Iterator[None]:
    """Migrate the test's database and hand the machine one connection on one event loop."""
    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(asyncpg.connect(database_url))
        try:
            loop.run_until_complete(migrate.migrate(conn))
            SendStateMachine.loop, SendStateMachine.conn = loop, conn
            yield
        finally:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()


def test_random_interleavings_keep_the_contract(database_url):
    with connected(database_url):
        run_state_machine_as_test(SendStateMachine, settings=settings(
            max_examples=30, stateful_step_count=25, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


class Script:
    """Stands in for st.data(): the draws of a minimized failing example, in order."""

    def __init__(self, *draws: Any) -> None:
        self.draws = list(draws)

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.draws.pop(0)


# Examples the machine found (minimized), each a bug fixed in the product SQL, replayed as is.
REGRESSIONS = {
    # A daemon whose work was adopted must not claim again: its claims would belong to no
    # instance row, so no reaper would ever release them (fixed: CLAIM is fenced by the lease).
    "zombie_claims": [("lease_lost_and_adopted", "A"), ("claim", "A", 1, set())],
    # Nor adopt: the adopted marks and messages would be orphaned the same way (fixed:
    # EXPIRED_INSTANCE requires the adopter's own live lease).
    "zombie_adopts": [("lease_lost_and_adopted", "A"), ("claim", "B", 2, set()),
                      ("mark_submitted", "B", 0.0, 1, [1]), ("expire_lease", "B1"),
                      ("adopt_expired", "A")],
    # A released claim of a cancelled campaign is cancelled, not queued forever (fixed:
    # RELEASE_UNSUBMITTED does what the writer does for released messages).
    "released_after_cancel": [("claim", "A", 1, set()), ("cancel", 1),
                              ("release_unsubmitted", "A")],
    # A daemon whose lease ended must not close a mark a reaper adopted: the adopter's messages
    # would lose the record that they may have been sent (fixed: the writer deletes only its own
    # marks).
    "zombie_closes_adopted_mark": [("claim", "A", 1, set()), ("mark_submitted", "A", 0.0, 1, [1]),
                                   ("lease_lost_and_adopted", "A"),
                                   ("write_mark_outcomes", "A", 1, SENT, 0.0)],
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions_found_by_the_machine(database_url, name):
    with connected(database_url):
        machine = SendStateMachine()
        machine.setup(credits=(2, 1), c1=[1, 1], c2=[1, 1], tx=[], accounts=["main"] * 20)
        machine.contract_holds()
        for action, *draws in REGRESSIONS[name]:
            machine.step(Script(action, *draws))
            machine.contract_holds()
        machine.teardown()
