"""IAM events from the bus: a deleted user or tenant leaves every flow; orphans are stopped."""

from __future__ import annotations

import pytest
from bson import ObjectId

from flow_repository.services.entries import definition_entry
from support import eventually

pytestmark = pytest.mark.integration

ORPHAN_REASON = "all owners were deleted"


def owner_ids(store, flow_id: str) -> list[str]:
    return [owner["id"] for owner in store.raw(ObjectId(flow_id))["owners"]]


def test_user_deleted_leaves_every_flow_and_running_orphans_stop(driver, drive, auth, listener,
                                                                 store):
    events = listener("flow.stopping")
    alone = drive(driver.deployment, auth("doomed-user", None))  # flows owned by this user only
    shared = drive(driver.deployment, auth("doomed-user", "tenant-keep"))  # ... and by a tenant
    flows = {
        "active orphan": alone.bring_to("active"),
        "starting orphan": alone.bring_to("starting"),
        "inactive orphan": alone.bring_to("inactive"),
        "stopping orphan": alone.bring_to("stopping"),
        "tenant-owned active": shared.bring_to("active"),
        "tenant-owned inactive": shared.bring_to("inactive"),
        "someone else's": driver.bring_to("active"),
    }
    def settled(flow_id: str) -> bool:  # events out and the relay's lease given back
        raw = store.raw(ObjectId(flow_id))
        return not raw["outbox"] and "relayLeaseOwner" not in raw

    eventually(lambda: all(settled(f) for f in flows.values()))
    before = {label: store.raw(ObjectId(f)) for label, f in flows.items()}

    driver.bus.publish("iam.user.deleted", "doomed-user")
    for label in ("active orphan", "starting orphan"):
        driver.wait_status(flows[label], "stopping")
    driver.barrier()

    after = {label: store.raw(ObjectId(f)) for label, f in flows.items()}
    for label in ("active orphan", "starting orphan"):
        assert after[label]["owners"] == []
        assert after[label]["statusReason"] == ORPHAN_REASON
        assert after[label]["revision"] == before[label]["revision"] + 1
        [message] = events.wait("flow.stopping", flows[label])
        assert message.payload["status"] == "stopping"
        assert message.payload["statusReason"] == ORPHAN_REASON
        assert message.payload["owners"] == []
    assert after["inactive orphan"]["owners"] == []
    assert after["inactive orphan"]["status"] == "inactive"
    assert after["stopping orphan"]["owners"] == []
    assert after["stopping orphan"]["status"] == "stopping"
    assert after["stopping orphan"]["statusReason"] == "stop requested"
    for label in ("tenant-owned active", "tenant-owned inactive"):
        assert owner_ids(store, flows[label]) == ["tenant-keep"]
        assert after[label]["status"] == before[label]["status"]
        assert after[label]["statusReason"] == before[label]["statusReason"]
        assert after[label]["revision"] == before[label]["revision"] + 1
    assert after["someone else's"] == before["someone else's"]
    eventually(lambda: all(not store.raw(ObjectId(f))["outbox"] for f in flows.values()))
    stopped = {m.flow_id for m in events.events("flow.stopping")}
    assert stopped == {flows["active orphan"], flows["starting orphan"], flows["stopping orphan"]}
    # the flow already stopping got its flow.stopping from the stop request, not a second one
    assert len(events.events("flow.stopping", flows["stopping orphan"])) == 1

    # the tenant still sees its flow; the deleted user's token sees nothing any more
    assert shared.client.get(f"/flows/{flows['tenant-owned active']}",
                             headers=auth("someone", "tenant-keep")).status_code == 200
    assert alone.client.get(f"/flows/{flows['inactive orphan']}",
                            headers=alone.headers).status_code == 404

    # a repeated deletion is harmless
    revisions = {label: store.raw(ObjectId(f))["revision"] for label, f in flows.items()}
    driver.bus.publish("iam.user.deleted", "doomed-user")
    driver.barrier()
    assert {label: store.raw(ObjectId(f))["revision"] for label, f in flows.items()} == revisions


def flow_fields(store, flow_id: str) -> dict:
    """The flow without the relay's bookkeeping (its lease, and on MongoDB the history
    entries it records after publishing), which may still change after the outbox empties."""
    return {key: value for key, value in store.raw(ObjectId(flow_id)).items()
            if key not in ("historyOutbox", "relayLeaseOwner", "relayLeaseUntil")}


def test_tenant_deleted_leaves_every_flow_and_running_orphans_stop(driver, drive, auth,
                                                                   listener, store):
    events = listener("flow.stopping")
    member = drive(driver.deployment, auth("member", "doomed-tenant"))
    flows = {status: member.bring_to(status) for status in ("active", "starting", "inactive")}
    co_owned = member.bring_to("active")
    other_tenant = drive(driver.deployment, auth("member", "tenant-keep")).bring_to("active")
    for flow_id in flows.values():  # leave the tenant as the only owner
        store.update(ObjectId(flow_id),
                     changes={"owners": [{"id": "doomed-tenant", "type": "tenant"}]},
                     history=definition_entry("member", "updated", {}))
    eventually(lambda: all(not store.raw(ObjectId(f))["outbox"]
                           for f in (*flows.values(), co_owned, other_tenant)))
    untouched = flow_fields(store, other_tenant)

    driver.bus.publish("iam.tenant.deleted", "doomed-tenant")
    driver.wait_status(flows["active"], "stopping")
    driver.wait_status(flows["starting"], "stopping")
    driver.barrier()

    for status in ("active", "starting"):
        flow = store.raw(ObjectId(flows[status]))
        assert flow["owners"] == []
        assert flow["statusReason"] == ORPHAN_REASON
        [message] = events.wait("flow.stopping", flows[status])
        assert message.payload["statusReason"] == ORPHAN_REASON
    assert store.raw(ObjectId(flows["inactive"]))["status"] == "inactive"
    assert store.raw(ObjectId(flows["inactive"]))["owners"] == []
    assert owner_ids(store, co_owned) == ["member"]
    assert store.raw(ObjectId(co_owned))["status"] == "active"
    assert flow_fields(store, other_tenant) == untouched
    eventually(lambda: not store.raw(ObjectId(flows["starting"]))["outbox"])
    assert events.events("flow.stopping", co_owned) == []
    assert events.events("flow.stopping", flows["inactive"]) == []
