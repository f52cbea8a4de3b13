"""Storage of flows: the backends behind one FlowStore contract, and what they share."""

from __future__ import annotations

from .base import StoreUnavailable, decode_keys, encode_keys, utcnow
from .mongo import FlowStore

__all__ = ["FlowStore", "StoreUnavailable", "decode_keys", "encode_keys", "utcnow"]
