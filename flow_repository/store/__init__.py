"""Storage of flows: the backends behind one Store contract, and the factory that picks one."""

from __future__ import annotations

from ..settings import Settings
from . import queries
from .base import Lease, Store, StoreUnavailable, decode_keys, encode_keys, utcnow
from .memory import MemoryFlowStore
from .mongo import FlowStore


def open_store(settings: Settings) -> Store:
    """The MongoDB store MONGODB_URL names, or the embedded in-memory store when it is unset."""
    if settings.embedded:
        return MemoryFlowStore()
    return FlowStore.from_settings(settings)


__all__ = [
    "FlowStore",
    "Lease",
    "MemoryFlowStore",
    "Store",
    "StoreUnavailable",
    "decode_keys",
    "encode_keys",
    "open_store",
    "queries",
    "utcnow",
]
