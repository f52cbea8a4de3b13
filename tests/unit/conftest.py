"""Fixtures for the in-process API tests: a fake clock, flow creation and error-shape checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flow_repository.adapters.store import FlowStore
from flow_repository.entrypoints.app import create_app
from flow_repository.settings import Settings

UNREACHABLE_MONGODB = "mongodb://127.0.0.1:1"


class FakeClock:
    """Stands in for store.utcnow: every reading is one second after the previous one."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Deterministic, strictly increasing timestamps for flow writes (services and store)."""
    fake = FakeClock(datetime(2024, 1, 1, tzinfo=UTC))
    for module in ("services.flows", "services.lifecycle", "services.entries", "adapters.outbox",
                   "adapters.relay"):
        monkeypatch.setattr(f"flow_repository.{module}.utcnow", fake)
    for backend in ("mongo", "sqlite"):
        monkeypatch.setattr(f"flow_repository.adapters.store.{backend}.utcnow", fake)
    return fake


def check_error(response: TestResponse, status: int) -> list[str]:
    """Assert the one error shape ``{"errors": [{"message", "code"}]}``; return the messages."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json", response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"errors"}, body
    assert body["errors"], body
    for item in body["errors"]:
        assert set(item) == {"message", "code"}, item
        assert item["code"] == status
        assert isinstance(item["message"], str) and item["message"]
    return [item["message"] for item in body["errors"]]


@pytest.fixture
def error_messages() -> Callable[[TestResponse, int], list[str]]:
    """error_messages(response, status): check the error shape and return its messages."""
    return check_error


@pytest.fixture
def create(client: FlaskClient, auth: Callable[..., dict[str, str]],
           flow_body: Callable[..., dict]) -> Callable[..., dict[str, Any]]:
    """create(body=None, headers=None, **flow_body_args): POST one flow, return its data."""

    def make(body: dict | None = None, headers: dict[str, str] | None = None,
             **body_args: Any) -> dict[str, Any]:
        response = client.post("/flows", json=body if body is not None else flow_body(**body_args),
                               headers=headers if headers is not None else auth())
        assert response.status_code == 201, response.get_json()
        return response.get_json()["data"]

    return make


@pytest.fixture
def build_app(settings: Settings, store: FlowStore) -> Callable[..., Flask]:
    """build_app(store=None, **setting_changes): another app on the test store (or ``store``)."""

    def build(store_override: FlowStore | None = None, **changes: Any) -> Flask:
        return create_app(settings.replace(**changes), store=store_override or store)

    return build


@pytest.fixture
def down_store() -> Iterator[FlowStore]:
    """A FlowStore on a MongoDB address where nothing listens (fails fast)."""
    mongo = pymongo.MongoClient(UNREACHABLE_MONGODB, serverSelectionTimeoutMS=200,
                                connectTimeoutMS=200)
    yield FlowStore(mongo["flow-repository-unreachable"])
    mongo.close()


@pytest.fixture
def start_flow(client: FlaskClient, auth: Callable[..., dict[str, str]]) -> Callable[[str], None]:
    """start_flow(id): POST /flows/{id}/start and check it moved to starting."""

    def start(flow_id: str) -> None:
        response = client.post(f"/flows/{flow_id}/start", headers=auth())
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == {"data": {"id": flow_id, "status": "starting"},
                                       "meta": {}}

    return start
