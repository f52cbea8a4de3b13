"""Storage of flows: the backends behind one Store contract, and the factory that picks one."""

from __future__ import annotations

from flow_repository.settings import Settings

from . import queries
from .base import Lease, Store, StoreUnavailable, decode_keys, encode_keys, utcnow
from .mongo import FlowStore
from .sqlite import SqliteFlowStore


def open_store(settings: Settings) -> Store:
    """The MongoDB store MONGODB_URL names, or the embedded SQLite store when it is unset."""
    if settings.embedded:
        return SqliteFlowStore.open(settings.embedded_database)
    return FlowStore.from_settings(settings)


__all__ = [
    "FlowStore",
    "Lease",
    "SqliteFlowStore",
    "Store",
    "StoreUnavailable",
    "decode_keys",
    "encode_keys",
    "open_store",
    "queries",
    "utcnow",
]
