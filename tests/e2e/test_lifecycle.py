"""A flow's whole life over the wire, as OIH's web UI and Component Orchestrator drive it."""

from __future__ import annotations

import time

import pytest

from support import Bus, Driver, Served, bearer

from .conftest import FakeIam

pytestmark = pytest.mark.e2e


def test_flow_lifecycle_through_ui_and_orchestrator(deploy, iam: FakeIam, bus: Bus, listener,
                                                    flow_body) -> None:
    events = listener()
    deployment = deploy()
    api = deployment.api
    token = iam.grant("ui-user", "tenant-a")
    headers = bearer(token)
    driver = Driver(deployment, bus, headers, None, flow_body)

    created = []
    for index in range(3):
        response = api.request("POST", "/flows", headers=headers,
                               json=flow_body(f"Flow {index}", nodes=2))
        assert response.status_code == 201, response.text
        data = response.json()["data"]
        assert data["status"] == "inactive"
        assert {"id": "ui-user", "type": "user"} in data["owners"]
        assert {"id": "tenant-a", "type": "tenant"} in data["owners"]
        assert "_id" not in data
        created.append(data["id"])
    flow_id = created[0]

    [creation] = events.wait("flowrepo.flow.created", flow_id)
    assert creation.payload == {"tenant": "tenant-a", "user": "ui-user", "flowId": flow_id}
    assert creation.body["headers"]["serviceName"] == "flow-repository"
    assert creation.routing_key == "flowrepo.flow.created"

    pages = []
    for number in (1, 2):
        page = api.get("/flows", headers=headers,
                       params={"page[size]": 2, "page[number]": number, "sort": "-createdAt"})
        assert page.status_code == 200, page.text
        assert page.json()["meta"] == {"total": 3, "page": number, "perPage": 2,
                                       "totalPages": 2}
        pages.append([flow["id"] for flow in page.json()["data"]])
    assert [len(ids) for ids in pages] == [2, 1]
    assert sorted(pages[0] + pages[1]) == sorted(created)

    # Another user of another tenant sees none of them.
    stranger = bearer(iam.grant("someone-else", "tenant-b"))
    assert api.get("/flows", headers=stranger).json()["meta"]["total"] == 0
    assert api.get(f"/flows/{flow_id}", headers=stranger).status_code == 404

    read = api.get(f"/flows/{flow_id}", headers=headers)
    assert read.status_code == 200
    etag = read.headers["ETag"]
    stale = api.request("PATCH", f"/flows/{flow_id}", headers={**headers, "If-Match": '"999"'},
                        json={"name": "never"})
    assert stale.status_code == 412, stale.text
    renamed = api.request("PATCH", f"/flows/{flow_id}", headers={**headers, "If-Match": etag},
                          json={"name": "Renamed"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["data"]["name"] == "Renamed"
    assert renamed.headers["ETag"] != etag
    again = api.request("PATCH", f"/flows/{flow_id}", headers={**headers, "If-Match": etag},
                        json={"name": "lost update"})
    assert again.status_code == 412
    [modified] = events.wait("flowrepo.flow.modified", flow_id)
    assert modified.payload["flowId"] == flow_id

    started = api.request("POST", f"/flows/{flow_id}/start", headers=headers)
    assert started.status_code == 200, started.text
    assert started.json()["data"] == {"id": flow_id, "status": "starting"}
    [starting] = events.wait("flow.starting", flow_id)
    payload = starting.payload
    assert payload["id"] == flow_id
    assert payload["startedBy"] == "ui-user"
    assert {"id": "ui-user", "type": "user"} in payload["owners"]
    assert abs(starting.body["headers"]["createdAt"] / 1000 - time.time()) < 60
    assert payload["name"] == "Renamed"
    assert payload["status"] == "starting"
    assert [node["id"] for node in payload["graph"]["nodes"]] == ["step_0", "step_1"]
    assert payload["graph"]["edges"][0]["source"] == "step_0"
    assert "_id" not in payload and "outbox" not in payload
    assert starting.properties.delivery_mode == 2
    assert driver.get(flow_id)["status"] == "starting"

    # A running flow is frozen: no edits, no deletion.
    assert api.request("PATCH", f"/flows/{flow_id}", headers=headers,
                       json={"name": "x"}).status_code == 409
    assert api.request("DELETE", f"/flows/{flow_id}", headers=headers).status_code == 409

    driver.report("flow.started", flow_id)
    driver.wait_status(flow_id, "active")

    stopped = api.request("POST", f"/flows/{flow_id}/stop", headers=headers)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["data"] == {"id": flow_id, "status": "stopping"}
    [stopping] = events.wait("flow.stopping", flow_id)
    assert stopping.payload["name"] == "Renamed"
    assert stopping.payload["status"] == "stopping"

    driver.report("flow.stopped", flow_id)
    driver.wait_status(flow_id, "inactive")

    deleted = api.request("DELETE", f"/flows/{flow_id}", headers=headers)
    assert deleted.status_code == 200, deleted.text
    [gone] = events.wait("flowrepo.flow.deleted", flow_id)
    assert gone.payload == {"tenant": "tenant-a", "user": "ui-user", "flowId": flow_id}
    assert api.get(f"/flows/{flow_id}", headers=headers).status_code == 404

    # Per flow, the events left in the order the changes happened.
    names = [message.name for message in events.events(flow_id=flow_id)]
    first = {name: names.index(name) for name in names}
    assert (first["flowrepo.flow.created"] < first["flowrepo.flow.modified"]
            < first["flow.starting"] < first["flow.stopping"] < first["flowrepo.flow.deleted"])


def test_start_many_reports_each_item(api: Served, iam: FakeIam, listener, flow_body) -> None:
    events = listener()
    headers = bearer(iam.grant("ui-user", "tenant-a"))
    response = api.request("POST", "/flows", headers=headers, json=flow_body("Batch"))
    assert response.status_code == 201
    flow_id = response.json()["data"]["id"]
    unknown = "0123456789abcdef01234567"

    results = api.request("POST", "/flows/multiple/start", headers=headers,
                          json=[flow_id, unknown, "not-an-id"])
    # OIH's startstop.js shape: a bare array aligned with the ids.
    assert results.status_code == 200, results.text
    started, absent, invalid = results.json()
    assert started == {"data": {"id": flow_id, "status": "starting"}, "meta": {}}
    assert [(e["flowId"], e["code"]) for e in absent["errors"]] == [(unknown, 404)]
    assert [(e["flowId"], e["code"]) for e in invalid["errors"]] == [("not-an-id", 400)]
    [starting] = events.wait("flow.starting", flow_id)
    assert starting.payload["startedBy"] == "ui-user"

    # The same list again: the started flow now conflicts.
    repeat = api.request("POST", "/flows/multiple/start", headers=headers, json=[flow_id])
    assert repeat.status_code == 200
    assert repeat.json()[0]["errors"][0]["code"] == 409
    stops = api.request("POST", "/flows/multiple/stop", headers=headers, json=[flow_id])
    assert stops.status_code == 200, stops.text
    assert stops.json() == [{"data": {"id": flow_id, "status": "stopping"}, "meta": {}}]
    events.wait("flow.stopping", flow_id)
