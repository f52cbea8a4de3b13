"""The OIH envelope the relay publishes, rendered from a stored outbox entry and its flow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from bson import ObjectId

from flow_repository.adapters import relay as relay_module
from flow_repository.adapters.outbox import envelope, pending_event
from flow_repository.adapters.rabbitmq import BrokerUnavailable
from flow_repository.adapters.relay import OutboxRelay
from flow_repository.adapters.store import FlowStore, utcnow
from support import eventually


def test_a_change_event_carries_its_literal_payload_and_the_oih_headers() -> None:
    event = pending_event("flowrepo.flow.created", {"tenant": "t", "user": "u", "flowId": "f"})
    message = envelope(event, {"_id": ObjectId()})
    assert message["payload"] == {"tenant": "t", "user": "u", "flowId": "f"}
    headers = message["headers"]
    assert headers["name"] == "flowrepo.flow.created"
    assert headers["serviceName"] == "flow-repository"
    assert headers["eventId"] == event["eventId"] and len(event["eventId"]) == 32
    assert isinstance(headers["createdAt"], int) and headers["createdAt"] > 1_700_000_000_000


def test_events_get_distinct_ids() -> None:
    assert pending_event("a", {})["eventId"] != pending_event("a", {})["eventId"]


def test_a_flow_event_renders_the_public_flow_with_its_overrides() -> None:
    flow_id = ObjectId()
    stored = {"_id": flow_id, "name": "n", "status": "active", "outbox": [], "startedBy": "x",
              "graph": {"nodes": [], "edges": []}}
    message = envelope(pending_event("flow.starting", status="starting", startedBy="u-1"), stored)
    payload = message["payload"]
    assert payload["id"] == str(flow_id)
    assert payload["status"] == "starting" and payload["startedBy"] == "u-1"
    assert payload["graph"] == {"nodes": [], "edges": []}
    assert not {"_id", "outbox"} & set(payload)


def test_a_delayed_start_event_still_reports_the_start_not_the_later_status(
    client, auth, create, start_flow, store: FlowStore, app
) -> None:
    flow = create()
    start_flow(flow["id"])
    started_at = client.get(f"/flows/{flow['id']}", headers=auth()).get_json()["data"][
        "statusChangedAt"]
    service = app.extensions["flow_repository"].service
    service.apply_status_event("flow.started", {"id": flow["id"]})  # the flow moves on
    stored = store.get(ObjectId(flow["id"]))
    assert stored["status"] == "active"
    starting = next(e for e in stored["outbox"] if e["name"] == "flow.starting")
    payload = envelope(starting, stored)["payload"]
    assert payload["status"] == "starting"
    assert payload["statusReason"] == "start requested"
    assert payload["startedBy"] == "user-1"
    assert payload["statusChangedAt"] == started_at


class RecordingPublisher:
    """Stands in for RabbitMQ: confirms everything and remembers the order."""

    exchange = "event-bus"

    def __init__(self) -> None:
        self.names: list[str] = []

    def publish(self, message) -> None:
        self.names.append(message["headers"]["name"])

    def publish_batch(self, messages, deadline: float, headers=None) -> int:
        for confirmed, message in enumerate(messages):
            try:
                self.publish(message)
            except BrokerUnavailable as error:
                raise BrokerUnavailable(error, confirmed) from error
        return len(messages)


def flow_with_two_pending_events(store: FlowStore) -> ObjectId:
    first = pending_event("flow.starting", status="starting")
    second = pending_event("flow.stopping", status="stopping")
    return store.insert({"name": "n", "status": "stopping", "outbox": [first, second]})["_id"]


def test_the_relay_publishes_a_flows_events_in_order_and_empties_its_outbox(store) -> None:
    flow_id = flow_with_two_pending_events(store)
    publisher = RecordingPublisher()
    assert OutboxRelay(store, publisher).publish_pending() == 2
    assert publisher.names == ["flow.starting", "flow.stopping"]
    raw = store.raw(flow_id)
    assert raw["outbox"] == []
    assert "relayLeaseOwner" not in raw


def test_a_relay_whose_lease_runs_short_stops_publishing_and_lets_go(store, monkeypatch) -> None:
    flow_id = flow_with_two_pending_events(store)
    claim_batch = store.claim_batch

    def claim_that_runs_short(*args, **kwargs):
        flows = claim_batch(*args, **kwargs)
        for flow in flows:
            flow["relayLeaseUntil"] = utcnow()  # as if the lease had run out meanwhile
        return flows

    monkeypatch.setattr(store, "claim_batch", claim_that_runs_short)
    publisher = RecordingPublisher()
    assert OutboxRelay(store, publisher).publish_pending() == 0
    assert publisher.names == []
    raw = store.raw(flow_id)
    assert [event["name"] for event in raw["outbox"]] == ["flow.starting", "flow.stopping"]
    assert "relayLeaseOwner" not in raw


def test_a_write_and_a_claim_in_one_millisecond_publish_each_event_once(
        store, monkeypatch) -> None:
    # A write here leases the flow to the relay, which claims it in the same millisecond (as
    # one it wanted: a write elsewhere found the lease held), before the hand-off arrives.
    # The claim must not read the write's lease back as its own: it did, on MongoDB, and the
    # flow went out once claimed and again handed over.
    frozen = utcnow()
    monkeypatch.setattr(relay_module, "utcnow", lambda: frozen)
    publisher = RecordingPublisher()
    relay = OutboxRelay(store, publisher)
    flow_id = flow_with_two_pending_events(store)
    lease = relay.lease()
    written = store.update(flow_id, events=[pending_event("flowrepo.flow.modified", {})],
                           history={"entryId": "h1", "change": "modified"}, lease=lease)
    assert (written["relayLeaseOwner"], written["relayLeaseUntil"]) == lease
    assert relay.publish_pending([flow_id]) == 0  # the write's lease is not the claim's
    relay.hand_off(written, lease)
    assert relay.relay_handed() == 3
    assert publisher.names == ["flow.starting", "flow.stopping", "flowrepo.flow.modified"]
    assert store.raw(flow_id)["outbox"] == []


class ReachablePublisher(RecordingPublisher):
    """RabbitMQ there: connecting succeeds and every event is confirmed."""

    connected = True

    def connect(self) -> None:
        pass

    def keep_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


class UnreachablePublisher(ReachablePublisher):
    """RabbitMQ away: every connection attempt fails."""

    connected = False

    def connect(self) -> None:
        raise BrokerUnavailable(OSError("connection refused"))


@contextlib.contextmanager
def running(relay: OutboxRelay) -> Iterator[OutboxRelay]:
    """The relay's own thread, running until the block ends."""
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def written_with_lease(store: FlowStore, relay: OutboxRelay, name: str) -> tuple[dict, tuple]:
    """A flow whose write took ``relay``'s lease and added one event, and that lease."""
    flow_id = store.insert({"name": name, "status": "inactive", "outbox": []})["_id"]
    lease = relay.lease()
    written = store.update(flow_id, events=[pending_event("flowrepo.flow.modified", {})],
                           history={"entryId": name, "change": "modified"}, lease=lease)
    assert (written["relayLeaseOwner"], written["relayLeaseUntil"]) == lease
    return written, lease


def test_a_relay_that_cannot_reach_rabbitmq_gives_back_what_it_was_handed(store) -> None:
    # It held every flow written during an outage (160 MiB for 10,000 flows) and the
    # leases with them; now the leases go back and the events wait in the outboxes.
    relay = OutboxRelay(store, UnreachablePublisher(), poll_seconds=0.05)
    relay.start()
    try:
        flows = []
        for number in range(5):
            written, lease = written_with_lease(store, relay, f"f{number}")
            relay.hand_off(written, lease)
            flows.append(written["_id"])
        eventually(lambda: all("relayLeaseOwner" not in store.raw(flow_id)
                               for flow_id in flows), 10, message="every lease given back")
    finally:
        relay.stop()
    assert [len(store.raw(flow_id)["outbox"]) for flow_id in flows] == [1] * 5
    publisher = RecordingPublisher()
    assert OutboxRelay(store, publisher).publish_pending() == 5  # RabbitMQ back: found
    assert publisher.names == ["flowrepo.flow.modified"] * 5


def test_flows_handed_beyond_what_a_relay_holds_are_let_go_to_the_poll(
        store, monkeypatch) -> None:
    monkeypatch.setattr(relay_module, "MAX_HANDED", 2)
    publisher = RecordingPublisher()
    relay = OutboxRelay(store, publisher)
    handed = [written_with_lease(store, relay, f"f{number}") for number in range(4)]
    for written, lease in handed:
        relay.hand_off(written, lease)
    assert relay.relay_handed() == 2  # the two held go out at once
    assert all("relayLeaseOwner" not in store.raw(written["_id"]) for written, _ in handed)
    assert relay.publish_pending() == 2  # the two let go: their leases back, the poll finds them
    assert publisher.names == ["flowrepo.flow.modified"] * 4


class BrokerFailingOnce(RecordingPublisher):
    """Confirms the first event, then is unreachable once, then confirms again."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 1

    def publish(self, message) -> None:
        if self.names and self.failures_left:
            self.failures_left -= 1
            raise BrokerUnavailable(OSError("connection reset"))
        super().publish(message)


def test_a_deleted_flow_is_kept_until_its_deletion_event_is_published(
    client, auth, create, store
) -> None:
    flow = create()
    assert client.delete(f"/flows/{flow['id']}", headers=auth()).status_code == 200
    flow_id = ObjectId(flow["id"])
    publisher = BrokerFailingOnce()
    relay = OutboxRelay(store, publisher)
    with pytest.raises(BrokerUnavailable):
        relay.publish_pending()  # created goes out, deleted does not; the lease is released
    raw = store.raw(flow_id)
    assert raw is not None and raw["deletedAt"] is not None
    assert [event["name"] for event in raw["outbox"]] == ["flowrepo.flow.deleted"]
    assert "relayLeaseOwner" not in raw
    assert relay.publish_pending() == 1
    assert publisher.names == ["flowrepo.flow.created", "flowrepo.flow.deleted"]
    assert store.raw(flow_id) is None


def test_leases_taken_in_one_millisecond_still_tell_their_writes_apart(store) -> None:
    relay = OutboxRelay(store, RecordingPublisher())
    ends = [relay.lease()[1] for _ in range(50)]  # far more than one per millisecond
    assert len(set(ends)) == len(ends) and ends == sorted(ends)


def test_a_flow_handed_over_by_a_write_that_did_not_take_the_lease_is_not_published(
        store) -> None:
    publisher = RecordingPublisher()
    relay = OutboxRelay(store, publisher)
    first, second = relay.lease(), relay.lease()  # two writes, one millisecond
    flow = store.insert({"name": "n", "status": "starting", "revision": 1,
                         "outbox": [pending_event("flow.starting", status="starting")],
                         "relayLeaseOwner": first[0], "relayLeaseUntil": first[1]})
    relay.hand_off(flow, first)
    assert relay.relay_handed() == 1
    # a later write in the same millisecond asked for a lease of its own but found this
    # relay's (already given back) one in its stale copy: nothing is published again
    relay.hand_off(flow, second)
    assert relay.relay_handed() == 0
    assert publisher.names == ["flow.starting"]


def test_history_a_writer_left_pending_is_recorded_by_the_relays_sweep(
        client, auth, create, store, app) -> None:
    # A writer died after its change and before it recorded the change's history entry:
    # nothing writes or reads that flow again, yet its history and the change feed get it.
    from datetime import timedelta

    if store.history_with_change:
        pytest.skip("no writer can leave an entry pending: it is written with its change")

    service = app.extensions["flow_repository"].service
    long_ago = utcnow() - timedelta(minutes=5)

    def written_by_a_dying_writer(**fields) -> ObjectId:
        flow_id = ObjectId(create()["id"])
        assert store.update(flow_id, changes={"description": "changed"}, history={
            "entryId": f"e-{flow_id}", "kind": "definition", "change": "updated",
            "at": fields.pop("at", long_ago), "sub": "user-1"}, **fields) is not None
        return flow_id

    left = written_by_a_dying_writer()
    recent = written_by_a_dying_writer(at=utcnow())  # its writer may be recording it now
    held = written_by_a_dying_writer(lease=("another-relay", utcnow() + timedelta(minutes=1)))
    deleted = written_by_a_dying_writer()
    assert store.update(deleted, changes={"deletedAt": utcnow()}, history={
        "entryId": "gone", "kind": "definition", "change": "deleted", "at": long_ago,
        "sub": "user-1"}) is not None  # a tombstone: the relay deleting it records its own
    assert [flow["_id"] for flow in store.unrecorded(utcnow() - timedelta(seconds=10), 10)] \
        == [left]

    # RabbitMQ away: the sweep publishes nothing, so it does not wait for the broker
    relay = OutboxRelay(store, UnreachablePublisher(), poll_seconds=0.05, lease_seconds=30,
                        record_history=service.record_pending_history)
    with running(relay):
        eventually(lambda: store.raw(left)["historyOutbox"] == [], 10,
                   message="the entry left pending recorded")
    assert store.history.get(left, 2)["change"] == "updated"
    assert (left, 2) in {(change["flowId"], change["revision"])
                         for change in store.changes.after(0, 100) if not change.get("hole")}
    for waiting in (recent, held):
        assert len(store.raw(waiting)["historyOutbox"]) == 1
        assert store.history.get(waiting, 2) is None
    assert relay.sweep() == 0  # nothing left that is its to record


def test_a_sweep_that_fails_does_not_hold_up_publishing(store, monkeypatch) -> None:
    def broken(before, limit):
        raise RuntimeError("a flow the sweep cannot read")

    monkeypatch.setattr(store, "unrecorded", broken)
    flow_id = flow_with_two_pending_events(store)
    publisher = ReachablePublisher()
    relay = OutboxRelay(store, publisher, poll_seconds=0.05)
    with running(relay):
        eventually(lambda: store.raw(flow_id)["outbox"] == [], 10,
                   message="the events published despite the failing sweep")
    assert publisher.names == ["flow.starting", "flow.stopping"]
